"""A local cluster started by tpr-ray keeps Ray's token authentication and listens on loopback only."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROC_HELPERS = textwrap.dedent("""
    import os

    def ray_pids():
        # this process and everything it started (Ray's GCS, raylet, workers)
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        pids, grew = {os.getpid()}, True
        while grew:
            new = {p for p, parent in parents.items() if parent in pids} - pids
            pids |= new
            grew = bool(new)
        return pids

    def listening_addresses(pids):
        inodes = set()
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
        found = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    found.add(decode(fields[1].split(":")[0]))
        return found

    def decode(hex_ip):
        raw = bytes.fromhex(hex_ip)
        if len(raw) == 4:
            return ".".join(str(b) for b in raw[::-1])
        import ipaddress
        address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        return str(address.ipv4_mapped or address)
""")

PROBE = PROC_HELPERS + textwrap.dedent("""
    import json, os
    import ray
    from tpr_ray.io.cluster import init_ray

    init_ray(num_cpus=1)
    from ray._raylet import AuthenticationMode, get_authentication_mode

    @ray.remote
    def worker_auth_mode():
        return os.environ.get("RAY_AUTH_MODE")

    listening = listening_addresses(ray_pids())
    print(json.dumps({"token": get_authentication_mode() == AuthenticationMode.TOKEN,
                      "worker_mode": ray.get(worker_auth_mode.remote()),
                      "listening": sorted(listening)}))
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_cluster_keeps_token_auth_and_binds_loopback(tmp_path):
    # A fresh process: the test session itself runs Ray with auth disabled (conftest).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["token"] is True and report["worker_mode"] == "token"
    assert report["listening"], "found no listening Ray sockets to check"
    assert set(report["listening"]) <= {"127.0.0.1", "::1"}, report["listening"]


def test_cluster_yaml_keeps_the_jobs_api_private():
    import yaml

    text = open(os.path.join(os.path.dirname(__file__), "..", "cluster.yaml")).read()
    config = yaml.safe_load(text)
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    starts = [c for c in head + workers if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in text
    assert any(target.endswith(".ray/auth_token") for target in config["file_mounts"])
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [r["FromPort"] for r in rules] == [22]
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "ray dashboard cluster.yaml" in header and "--address http://<head>" not in header
