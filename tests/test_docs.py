"""The README's tour and the docs' commands on built-in data run as written (with small
settings), and the demo's console is quiet: tpr-ray's lines only, Ray's noise in a log file."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("PlacementGroupCleaner", "TrainingReport(", "Checkpoint successfully created",
         "No pretrained weights loaded", "Started a local Ray instance", "Token authentication is enabled",
         "core_worker.cc", "constructor arguments in the object store")
MAX_CONSOLE_LINES = 30
SMALL = {"demo": ["--ids", "12", "--epochs", "1"], "data synth": ["--ids", "12"]}


def documented_commands() -> list[list[str]]:
    """`tpr-ray` lines of the README's tested block and of docs/ blocks that use built-in data
    (the demo's output, synthetic data) - the ones a reader can run without a dataset."""
    commands = []
    readme = open(os.path.join(ROOT, "README.md")).read()
    tested = readme.split("<!-- tested:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    blocks = [tested]
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        text = open(os.path.join(ROOT, "docs", name)).read()
        blocks += [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "synth/" in b]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("tpr-ray ") and ("/data/" not in line or "synth/" in line):
                words = shlex.split(line, comments=True)[1:]
                if words[0] != "data" or words[1] in ("synth", "stats"):
                    commands.append(words)
    return commands


def small(words: list[str], work: str) -> list[str]:
    words = [w.replace("demo_out", f"{work}/demo_out").replace("synth/", f"{work}/synth/") for w in words]
    for path, extra in SMALL.items():
        if words[:len(path.split())] == path.split():
            for flag, value in zip(extra[::2], extra[1::2]):
                if flag in words:
                    words[words.index(flag) + 1] = value
                else:
                    words += [flag, value]
    return words


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's first command, run as a user runs it (own process, Ray auth on)."""
    work = str(tmp_path_factory.mktemp("docs"))
    first = documented_commands()[0]
    assert first[0] == "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "TPR_RAY_VERBOSE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "cli.main", *small(first, work)], env=env, cwd=work,
                          capture_output=True, text=True, timeout=900)
    return work, proc


@pytest.mark.slow
def test_demo_console_is_quiet_and_the_noise_is_in_the_log_file(demo):
    work, proc = demo
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert len(console.strip().splitlines()) <= MAX_CONSOLE_LINES, console
    assert not [noise for noise in NOISE if noise in console], console
    assert not re.search(r"\x1b\[", console), "ANSI colour codes in redirected output"
    assert "chance" in console and "tpr-ray search --index" in console  # ends with what to try next
    log = open(os.path.join(work, "demo_out", "tpr-ray-demo.log")).read()
    assert "Started a local Ray instance" in log  # what the console left out is kept
    assert "constructor arguments in the object store" in log  # Ray's C++ lines too


@pytest.mark.slow
def test_documented_commands_on_built_in_data_run(demo):
    from cli.main import cli

    work, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = documented_commands()[1:]
    assert any(c[0] == "search" for c in commands) and any(c[:2] == ["data", "synth"] for c in commands)
    for words in commands:
        result = CliRunner().invoke(cli, small(words, work))
        assert result.exit_code == 0, (words, result.output)


def _doc(name: str) -> str:
    return open(os.path.join(ROOT, name)).read()


def test_the_docs_cfine_schedule_is_the_recipes():
    from tpr_ray.methods.cfine import CFine

    said = re.search(r"×0\.1 at epochs ([\d, and]+) \(", _doc("docs/training.md").replace("\n", " "))
    assert said, "docs/training.md no longer states CFine's lr milestones"
    assert tuple(int(n) for n in re.findall(r"\d+", said.group(1))) == tuple(CFine.default_recipe.step_milestones)


def test_the_docs_pixel_limit_is_the_decoders():
    from tpr_ray.io.images import MAX_PIXELS

    said = re.search(r"over 2\^(\d+) = ([\d.]+) M pixels", _doc("docs/embedding.md").replace("\n", " "))
    assert said, "docs/embedding.md no longer states the pixel limit"
    assert 2 ** int(said.group(1)) == MAX_PIXELS and float(said.group(2)) == round(MAX_PIXELS / 1e6, 1)


def test_the_docs_ray_version_is_the_pinned_one():
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', _doc("pyproject.toml")).group(1)
    found = 0
    for name in ["README.md", *(f"docs/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "docs"))))]:
        for version in re.findall(r'rayVersion: "([\d.]+)"|rayproject/ray:([\d.]+)|ray==([\d.]+)', _doc(name)):
            assert pinned in version, (name, version, pinned)
            found += 1
    assert found, "no doc names the Ray version any more: drop this test"


def test_the_docs_say_how_to_view_a_runs_tensorboard_files():
    from tpr_ray.training.tracking import TENSORBOARD_DIR

    text = _doc("docs/tracking.md")
    assert re.search(r"pip install tensorboard==\d+\.\d+\.\d+", text)
    assert re.search(rf"tensorboard --logdir \S+/{TENSORBOARD_DIR}\b", text)


def readme_query() -> str:
    searches = [words for words in documented_commands() if words[0] == "search"]
    return searches[0][-1]


def test_the_readme_query_describes_a_person_of_the_demo_test_split():
    from tpr_ray.data.synth import make_identities

    query = readme_query().lower()
    matches = [person for person in make_identities("cuhk", 200, 0)  # the demo's identities
               if person.split == "test" and f"{person.upper_colour} {person.upper}" in query
               and f"{person.lower_colour} {person.lower}" in query]
    assert matches, f"nobody in the demo's test split looks like the README's query {query!r}"


@pytest.mark.slow
def test_the_readme_query_is_the_caption_the_demo_suggests(tmp_path):
    """The demo's default data has an image with exactly this caption, so the top hits can match."""
    from tpr_ray.data import synthesize
    from tpr_ray.workflows.demo import _a_test_caption

    assert readme_query() == _a_test_caption(synthesize("cuhk", 200, 0, str(tmp_path / "cuhk")))
