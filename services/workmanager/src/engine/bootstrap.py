"""Host side of a Python worker, started by virtufin-workmanager as
`python3 -I -B bootstrap.py --socket PATH --code PATH --blocked a,b,c`.

Connects to the workmanager's Unix socket and speaks frames of a 4-byte
big-endian length + UTF-8 JSON: sends `ready`, then answers `process`
with `result` (or `error`), `ping` with `pong`, and stops on `shutdown`.
The user's module defines `Process(event)` returning a CloudEvent-shaped
dict or None. Modules on the blocked list cannot be imported by it.
"""

import importlib.abc
import json
import socket as _socket_module
import struct
import sys
import traceback

_sock_cls = _socket_module.socket
_AF_UNIX = _socket_module.AF_UNIX
_SOCK_STREAM = _socket_module.SOCK_STREAM


def _arg(name):
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args else ""


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked):
        self.blocked = blocked

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if fullname in self.blocked or top in self.blocked:
            raise ImportError(f"{fullname} is not allowed in a Virtufin worker")
        return None


def _recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("the workmanager closed the connection")
        buf += chunk
    return buf


def _recv(conn):
    (length,) = struct.unpack(">I", _recv_exact(conn, 4))
    return json.loads(_recv_exact(conn, length).decode("utf-8"))


def _send(conn, frame):
    body = json.dumps(frame).encode("utf-8")
    conn.sendall(struct.pack(">I", len(body)) + body)


def main():
    conn = _sock_cls(_AF_UNIX, _SOCK_STREAM)
    conn.connect(_arg("--socket"))
    blocked = {m for m in _arg("--blocked").split(",") if m}
    limit = int(_arg("--memory-limit") or "0")
    if limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The user's code must not reach what we used ourselves: forget the
    # loaded blocked modules, then refuse them on import.
    for name in list(sys.modules):
        if name in blocked or name.split(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker(blocked))
    namespace = {"__name__": "virtufin_worker"}
    try:
        with open(_arg("--code"), encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "worker.py", "exec"), namespace)
        process = namespace.get("Process")
        if not callable(process):
            raise NameError("the worker module defines no Process(event) function")
    except BaseException as e:  # report any load failure to the host
        _send(conn, {"type": "error", "error_type": type(e).__name__, "message": str(e)})
        return 1
    _send(conn, {"type": "ready"})
    while True:
        frame = _recv(conn)
        kind = frame.get("type")
        if kind == "ping":
            _send(conn, {"type": "pong"})
        elif kind == "shutdown":
            return 0
        elif kind == "process":
            try:
                result = process(frame.get("event") or {})
                if result is not None and not isinstance(result, dict):
                    raise TypeError(f"Process returned {type(result).__name__}, expected a dict or None")
                _send(conn, {"type": "result", "event": result})
            except Exception as e:
                _send(conn, {
                    "type": "error",
                    "error_type": type(e).__name__,
                    "message": str(e),
                    "traceback": traceback.format_exc(limit=5),
                })


if __name__ == "__main__":
    sys.exit(main())
