#!/usr/bin/env python3
"""A shim of the NixOS test driver (nixos/lib/test-driver) over
systemd-nspawn + nsenter, for running checks/nixos/chain.py unchanged
against a container root that host.py wrote.

    driver.py ROOT CONSOLE_LOG TEST_SCRIPT_FILE

The test script sees what the driver gives a test script with one node
called `machine`: `machine`, `machines`, `start_all()`, `subtest()`,
`retry()` and the exception `RequestedAssertionFailed`. `machine` has the
driver's `Machine` methods that make sense for a container, with the
driver's semantics:

- `execute(cmd, check_return=True, check_output=True, timeout=900)` runs
  `timeout T bash -c 'set -euo pipefail; cmd'` as root in the container,
  in /tmp, and returns (status, stdout); stderr goes to this log. Like the
  driver it waits for stdout to close (a command that detaches must
  redirect it).
- `succeed`/`fail` raise RequestedAssertionFailed with the driver's words;
  their timeout defaults to none.
- `wait_until_succeeds`/`wait_until_fails`/`wait_for_unit`/`wait_for_file`/
  `wait_for_open_port`/`wait_for_closed_port` retry every second up to
  `timeout` tries, as the driver's `retry` does; `wait_for_unit` raises on
  "failed", and on "inactive" with no pending jobs.
- `systemctl(q)`, `get_unit_info`, `get_unit_property`,
  `require_unit_state`, `start_job`, `stop_job`, `sleep` (in the guest).
- `start()` boots the container (checks/chain/container.sh boot, shared
  with the Debian chain test) and, unlike the driver, returns once the boot
  has finished; `shutdown()` powers it off and waits for it;
  `crash()` kills its PID 1 (power loss); `reboot()` reboots it and boots
  it again.

What a container has no use for (screens, keyboards, QMP, VLANs) is not
here: a script that calls it fails with AttributeError. The differences
from a NixOS host are in host.py's DIFFERENCES; the only one the shim adds
is PATH: /run/current-system/sw/bin (as on NixOS), then Debian's.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

CONTAINER_SH = Path(__file__).resolve().parents[2] / "chain" / "container.sh"
PATH = "/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START = time.monotonic()


class RequestedAssertionFailed(AssertionError):
    """The driver's exception for a failed machine assertion."""


def log(message):
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


@contextmanager
def nested(message):
    log(message)
    started = time.monotonic()
    try:
        yield
    finally:
        log(f"  ({message[:60]}: {time.monotonic() - started:.2f} s)")


def retry(fn, timeout=900):
    """Calls fn every second until it returns True, for at most `timeout`
    tries (the driver's retry)."""
    for _ in range(timeout):
        if fn(False):
            return
        time.sleep(1)
    if not fn(True):
        raise RequestedAssertionFailed(f"action timed out after {timeout} tries with one-second pause in-between")


class Machine:
    def __init__(self, name, root, console):
        self.name = name
        self.root = root
        self.console = console
        self.nspawn = None
        self.leader = None
        self.booted = False

    def __repr__(self):
        return f"<Machine '{self.name}'>"

    # --- lifecycle -----------------------------------------------------------
    def start(self, allow_reboot=False):
        if self.booted:
            return
        with nested(f"{self.name}: starting the container ({self.root})"):
            out = subprocess.run(
                [str(CONTAINER_SH), "boot", self.root, self.console],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            ).stdout.split()
            self.nspawn, self.leader = int(out[0]), int(out[1])
            self.booted = True

    def _wait_for_exit(self):
        for _ in range(600):
            if not os.path.exists(f"/proc/{self.nspawn}"):
                break
            time.sleep(0.1)
        else:
            raise RequestedAssertionFailed(f"{self.name}: the container did not stop within 60 s")
        self.booted = False
        self.nspawn = self.leader = None

    def shutdown(self):
        if not self.booted:
            return
        with nested(f"{self.name}: powering off"):
            subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "poweroff"], check=False)
            self._wait_for_exit()

    def crash(self):
        if not self.booted:
            return
        with nested(f"{self.name}: forced crash"):
            os.kill(self.leader, signal.SIGKILL)
            self._wait_for_exit()

    def reboot(self):
        with nested(f"{self.name}: reboot"):
            subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "reboot"], check=False)
            self._wait_for_exit()
        self.start()

    def release(self):
        if self.booted and os.path.exists(f"/proc/{self.nspawn}"):
            os.kill(self.nspawn, signal.SIGTERM)
            try:
                self._wait_for_exit()
            except RequestedAssertionFailed:
                os.kill(self.nspawn, signal.SIGKILL)

    # --- commands ------------------------------------------------------------
    def execute(self, command, check_return=True, check_output=True, timeout=900):
        self.start()
        argv = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", "-C", "/tmp",
                f"PATH={PATH}", "HOME=/root", "USER=root", "LANG=C.UTF-8", "TERM=dumb"]
        if timeout is not None:
            argv += ["timeout", str(timeout)]
        argv += ["bash", "-c", f"set -euo pipefail; {command}"]
        if not check_output:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            return (-2, "")
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        out = p.stdout.decode(errors="replace")
        return (p.returncode if check_return else -1, out)

    def succeed(self, *commands, timeout=None):
        output = ""
        for command in commands:
            with nested(f"{self.name}: must succeed: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status != 0:
                    log(f"output: {out}")
                    raise RequestedAssertionFailed(f"command `{command}` failed (exit code {status})")
                output += out
        return output

    def fail(self, *commands, timeout=None):
        output = ""
        for command in commands:
            with nested(f"{self.name}: must fail: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status == 0:
                    raise RequestedAssertionFailed(f"command `{command}` unexpectedly succeeded")
                output += out
        return output

    def _wait_until(self, command, timeout, succeeds):
        output = ""

        def check(_last):
            nonlocal output
            status, output = self.execute(command, timeout=timeout)
            return (status == 0) == succeeds

        with nested(f"{self.name}: waiting for {'success' if succeeds else 'failure'}: {command}"):
            retry(check, timeout)
            return output

    def wait_until_succeeds(self, command, timeout=900):
        return self._wait_until(command, timeout, succeeds=True)

    def wait_until_fails(self, command, timeout=900):
        return self._wait_until(command, timeout, succeeds=False)

    def systemctl(self, q, user=None):
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def get_unit_info(self, unit, user=None):
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            raise RequestedAssertionFailed(f'retrieving systemctl info for unit "{unit}" failed with exit code {status}')
        return dict(line.split("=", 1) for line in lines.split("\n") if "=" in line)

    def get_unit_property(self, unit, property, user=None):
        status, lines = self.systemctl(f'--no-pager show "{unit}" --property="{property}"', user)
        if status != 0:
            raise RequestedAssertionFailed(
                f'retrieving systemctl property "{property}" for unit "{unit}" failed with exit code {status}'
            )
        name, _, value = lines.rstrip("\n").partition("=")
        assert name == property, f'systemctl show --property "{property}" "{unit}" produced invalid output: {lines}'
        return value

    def wait_for_unit(self, unit, user=None, timeout=900):
        def check_active(_last):
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "{state}"')
            if state == "inactive":
                _, jobs = self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs and self.get_unit_info(unit, user)["ActiveState"] == state:
                    raise RequestedAssertionFailed(f'unit "{unit}" is inactive and there are no pending jobs')
            return state == "active"

        with nested(f"{self.name}: waiting for unit {unit}"):
            retry(check_active, timeout)

    def require_unit_state(self, unit, require_state="active"):
        state = self.get_unit_info(unit)["ActiveState"]
        if state != require_state:
            raise RequestedAssertionFailed(
                f"Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
            )

    def start_job(self, jobname, user=None):
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname, user=None):
        return self.systemctl(f"stop {jobname}", user)

    def wait_for_file(self, filename, timeout=900):
        with nested(f"{self.name}: waiting for file '{filename}'"):
            retry(lambda _: self.execute(f"test -e {filename}")[0] == 0, timeout)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        with nested(f"{self.name}: waiting for TCP port {port} on {addr}"):
            retry(lambda _: self.execute(f"nc -z {addr} {port}")[0] == 0, timeout)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        with nested(f"{self.name}: waiting for TCP port {port} on {addr} to be closed"):
            retry(lambda _: self.execute(f"nc -z {addr} {port}")[0] != 0, timeout)

    def sleep(self, secs):
        # In guest time, as the driver does.
        self.succeed(f"sleep {secs}")


def main():
    if len(sys.argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    root, console, script_file = sys.argv[1:]
    script = Path(script_file).read_text()
    machine = Machine("machine", root, console)
    machines = [machine]

    def start_all():
        with nested("starting all VMs"):
            for m in machines:
                m.start()

    @contextmanager
    def subtest(name):
        with nested(f"subtest: {name}"):
            try:
                yield
            except Exception as e:
                log(f'Test "{name}" failed with error: "{e}"')
                raise

    scope = {
        "machine": machine,
        "machines": machines,
        "start_all": start_all,
        "subtest": subtest,
        "retry": retry,
        "RequestedAssertionFailed": RequestedAssertionFailed,
        "log": log,
    }
    try:
        exec(compile(script, "testScript (checks/nixos/chain.py)", "exec"), scope)
    except Exception:
        traceback.print_exc()
        log("test script FAILED")
        return 1
    finally:
        for m in machines:
            m.release()
    log("test script finished: all subtests passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
