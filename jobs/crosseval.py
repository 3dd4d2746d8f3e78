"""Ray job entry point for the cross-dataset matrix:
`ray job submit --working-dir . -- python -m jobs.crosseval --methods baseline,pd --train cuhk,icfg
--test cuhk,icfg,rstp --out s3://...`.

Takes exactly the options of `tpr-ray crosseval`."""

from . import run

if __name__ == "__main__":
    run("crosseval", "crosseval")
