"""A fork server for the tests' `gencli worker` and `gencli serve` processes: the imports paid once.

A `gencli worker` spends most of its start-up importing torch, Celery, SQLAlchemy and the tokenizer
(about 2.5 of its 2.8 s on the 2-core machine), and the suite starts about a hundred of them. This
process imports all of that once, single-threaded, and then forks one child per worker asked for:
each child is a process of its own (its own pid and session, signals, SIGKILL, exit status) that
sets the environment, working directory and log it was given and runs `gencli`'s real command line,
exactly as `python -m gencli.cli ARGS` would after its imports. What it does not cover, the
imports and the interpreter's start, is covered by every test that starts a real `gencli` command
(`gencli workers`, the demo, the container stack, the CLI tests).

Protocol, one Unix-socket connection per child: the test sends one JSON line {"args", "env", "cwd",
"log"}; the server answers {"pid": N} at once and {"returncode": R} when the child has exited (R as
subprocess.Popen gives it: -signal for a killed child). The server ends when its parent does.

Run as: python forkserver.py SOCKET_PATH  (tests/services.py starts it; set GENCLI_TEST_FORK=0 to
start every worker with a fresh interpreter instead).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import traceback


def _preload() -> None:
    import celery.bin.celery  # noqa: F401 - the worker's command line goes through it
    import celery.worker  # noqa: F401
    import uvicorn  # noqa: F401 - and `gencli serve`'s

    import gencli.api.app  # noqa: F401
    import gencli.cli.main  # noqa: F401
    import gencli.worker.serve  # noqa: F401
    from gencli.model.tokenizer import load_encoding

    load_encoding("cl100k_base")  # (cached per process: each child starts with it loaded)


def _child(request: dict) -> None:
    """In the forked child: become the worker process asked for, and never return."""
    code = 1
    try:
        os.setsid()
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["gencli", *request["args"]]
        from gencli.cli.main import main

        main.main(args=request["args"], prog_name="gencli")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an interpreter would: the traceback, then status 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    _preload()
    if threading.active_count() != 1:
        raise RuntimeError(f"the fork server must fork from one thread; the imports started {threading.enumerate()}")
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bound and listening under another name first: the test process waits for `path` to exist,
    # and a connect between bind and listen would be refused
    server.bind(path + ".new")
    server.listen(64)
    os.rename(path + ".new", path)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        readable, _, _ = select.select([server], [], [], 0.05)
        if readable:
            conn, _ = server.accept()
            request = json.loads(conn.makefile("rb").readline())
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                for c in children.values():
                    c.close()
                _child(request)
            children[pid] = conn
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    conn.sendall(json.dumps({"returncode": rc}).encode() + b"\n")
                except OSError:
                    pass  # its test went away
                conn.close()
    for pid in children:  # the tests are gone: so are their workers
        try:
            os.killpg(pid, 9)
        except OSError:
            pass


if __name__ == "__main__":
    serve(sys.argv[1])
