"""``xw demo``: an embedded SQLite server, a local worker, a registered app, a submitted work, its result.

Everything runs in a temporary directory on loopback and is stopped at the end.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

from xwhep.client import Client

READY = "xwhep server ready at "

APP = textwrap.dedent("""\
    #!/bin/sh
    # A tiny job: reads its dirin file and its stdin, writes a result file.
    echo "running on $(uname -s) as $(id -un) in $(pwd), args: $*"
    {
      echo "greeting from the dirin: $(cat greeting.txt)"
      echo "numbers from stdin summed: $(awk '{s+=$1} END {print s}')"
    } > result.txt
    """)


def main() -> int:
    """Run the demo; return the process exit code."""
    with tempfile.TemporaryDirectory(prefix="xwhep-demo-") as tmp:
        d = Path(tmp)
        print(f"== xwhep demo in {d}", flush=True)
        server = subprocess.Popen([sys.executable, "-m", "xwhep.server", "--home", str(d / "server"), "--port", "0",
                                   "--alive-period", "2"], stdout=subprocess.PIPE, text=True)
        worker = None
        try:
            assert server.stdout is not None
            for line in server.stdout:
                if line.startswith(READY):
                    print("== " + line.strip(), flush=True)
                    break
            else:
                print("demo: the server did not start", file=sys.stderr)
                return 1
            worker = subprocess.Popen([sys.executable, "-m", "xwhep.worker",
                                       "--config", str(d / "server" / "worker.conf"),
                                       "--workdir", str(d / "worker"), "--pool", "1"])
            admin = Client.from_config(d / "server" / "admin.conf")
            prog = d / "hello.sh"
            prog.write_text(APP)
            app = admin.put_app("hello", binaries={"linux/x86_64": prog})
            print(f"== registered app hello: {app['uri']}", flush=True)
            env = d / "env"
            env.mkdir()
            (env / "greeting.txt").write_text("hello from the desktop grid\n")
            stdin = d / "numbers.txt"
            stdin.write_text("1\n2\n3\n4\n")
            work = admin.submit("hello", args="--demo 42", xwenv=str(env), stdin=str(stdin), label="demo")
            print(f"== submitted work {work['uri']}", flush=True)
            status = admin.wait([work["uid"]], timeout=120)[work["uid"]]
            print(f"== work {status}", flush=True)
            if status != "COMPLETED":
                print(f"demo: work ended {status}: {admin.work(work['uid']).get('reason')}", file=sys.stderr)
                return 1
            result = admin.fetch_result(work["uid"], d)
            print(f"== result {result.name} (sha256 verified):", flush=True)
            with zipfile.ZipFile(result) as z:
                for name in z.namelist():
                    print(f"--- {name}")
                    print(z.read(name).decode().rstrip())
            return 0
        finally:
            for p in (worker, server):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()


if __name__ == "__main__":
    sys.exit(main())
