# Test script of checks/nixos/chain.nix (BACKEND is defined before this).
# Mirrors checks/chain/run.sh: readiness order from systemd's own
# timestamps, the api waiting for its store, the seed's grpcurl smoke check,
# kill -9 of the api with the others re-handshaking in place, and a reboot
# that keeps state, a WebSocket connection and a Python worker.
import json
import re
import shlex

DAPR = BACKEND == "dapr"
UNITS = ["virtufin-api", "virtufin-websocketmanager", "virtufin-workmanager"]
SUB = {"topic": "websocketmanager.connectionstatus", "subscriber": "test", "group": "smoke"}


def prop(unit, name):
    return machine.succeed(f"systemctl show -P {name} {unit}").strip()


def grpcurl(method, body=None):
    data = "" if body is None else "-d " + shlex.quote(json.dumps(body)) + " "
    return f"grpcurl -plaintext {data}virtufin-api:5002 {method}"


def field(output, name):
    match = re.search(rf'"{name}":"([^"]*)"', output)
    assert match, f"no {name} in {output!r}"
    return match.group(1)


def boot():
    machine.wait_for_unit("redis-virtufin.service")
    if DAPR:
        machine.wait_for_unit("virtufin-daprd.service")
    for unit in UNITS:
        machine.wait_for_unit(f"{unit}.service")


def ready_in_place(unit, pid, probe):
    machine.wait_until_succeeds(
        f"test \"$(systemctl show -P StatusText {unit})\" = '{unit} ready' && {probe}",
        timeout=60,
    )
    assert prop(unit, "MainPID") == pid, f"{unit} was restarted"


def answers(payload):
    # The worker answers an event on chain-jobs with one on chain-answers.
    # (No --count 1: the group may still hold an earlier answer.)
    machine.succeed(
        "virtufin subscribe chain-answers >/tmp/answer.out 2>&1 & echo $! >/tmp/answer.pid"
    )
    machine.sleep(1)
    machine.succeed(f"virtufin publish chain-jobs {payload}")
    machine.wait_until_succeeds(f"grep -q {payload} /tmp/answer.out", timeout=30)
    machine.succeed("kill $(cat /tmp/answer.pid)")


start_all()

with subtest("each unit is active; the downstream ones started after the api was ready"):
    boot()
    api_ready = int(prop("virtufin-api", "ActiveEnterTimestampMonotonic"))
    for unit in ["virtufin-websocketmanager", "virtufin-workmanager"]:
        started = int(prop(unit, "ExecMainStartTimestampMonotonic"))
        assert started >= api_ready, f"{unit} started ({started}) before the api was ready ({api_ready})"
    if DAPR:
        # virtufin-daprd is active only once /v1.0/healthz answered (ExecStartPost).
        daprd_healthy = int(prop("virtufin-daprd", "ActiveEnterTimestampMonotonic"))
        api_started = int(prop("virtufin-api", "ExecMainStartTimestampMonotonic"))
        assert api_started >= daprd_healthy, "the api started before daprd was healthy"
        machine.succeed(
            "test $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3500/v1.0/healthz) = 204"
        )

with subtest("the api is not active while Valkey does not answer, and is once it does"):
    machine.succeed("systemctl kill -s SIGSTOP redis-virtufin.service")
    machine.succeed("systemctl restart --no-block virtufin-api.service")
    machine.fail(
        "for i in $(seq 30); do systemctl is-active -q virtufin-api && exit 0; sleep 0.1; done; exit 1"
    )
    machine.succeed("systemctl kill -s SIGCONT redis-virtufin.service")
    for unit in UNITS:
        machine.wait_for_unit(f"{unit}.service")

with subtest("the seed's grpcurl smoke check"):
    machine.succeed(grpcurl("virtufin.api.v1.Health/HealthCheck"))
    machine.succeed(
        grpcurl("virtufin.api.v1.Pubsub/Subscribe", SUB)
        + " >/tmp/sub.out 2>&1 & echo $! >/tmp/sub.pid"
    )
    machine.wait_until_succeeds(
        "curl -fsS http://127.0.0.1:5001/v1/pubsub/subscriptions"
        " | jq -e '.subscriptions | any(.subscriber == \"test\" and .group == \"smoke\")'",
        timeout=30,
    )
    machine.succeed(
        grpcurl(
            "virtufin.api.v1.Pubsub/PublishEvent",
            {
                "topic": "websocketmanager.connectionstatus",
                "data": json.dumps({"connection_id": "smoke", "url": "ws://localhost"}),
                "metadata": {
                    "ce-type": "com.virtufin.websocketmanager.connection.connected",
                    "ce-source": "urn:test",
                    "ce-id": "smoke-1",
                },
            },
        )
    )
    machine.succeed(grpcurl("virtufin.api.v1.Pubsub/Unsubscribe", SUB))
    machine.wait_until_fails("kill -0 $(cat /tmp/sub.pid)", timeout=10)
    machine.succeed("grep -q '\"id\": \"smoke-1\"' /tmp/sub.out")
    machine.succeed("virtufin smoke")

with subtest("kill -9 of the api: restarted by systemd, the others re-handshake in place"):
    machine.succeed("virtufin state set chain acknowledged before-kill")
    wsm_pid = prop("virtufin-websocketmanager", "MainPID")
    wm_pid = prop("virtufin-workmanager", "MainPID")
    machine.succeed("systemctl kill -s KILL virtufin-api.service")
    machine.wait_until_succeeds("test $(systemctl show -P NRestarts virtufin-api) -ge 1", timeout=30)
    machine.wait_for_unit("virtufin-api.service")
    ready_in_place("virtufin-websocketmanager", wsm_pid, "virtufin ws list")
    ready_in_place("virtufin-workmanager", wm_pid, "virtufin workers list")
    machine.succeed("virtufin state get chain acknowledged | grep -q before-kill")

with subtest("a WebSocket connection and a Python worker, end to end"):
    machine.wait_for_unit("ws-echo.service")
    machine.wait_for_open_port(9100)
    conn = field(machine.succeed("virtufin ws connect ws://127.0.0.1:9100/ --auto-reconnect"), "id")
    assert machine.succeed(f"virtufin ws send {conn} hello").strip() == "hello"
    worker = field(
        machine.succeed(
            "virtufin workers create /etc/virtufin-test/echo.py --topic chain-jobs --start"
        ),
        "id",
    )
    machine.wait_until_succeeds(
        f"virtufin workers list | grep '\"id\":\"{worker}\"' | grep -q '\"status\":\"running\"'",
        timeout=30,
    )
    answers("before-reboot")
    machine.succeed("virtufin state set chain across-reboot kept")

with subtest("reboot: state, the connection and the worker come back"):
    machine.shutdown()
    machine.start()
    boot()
    machine.succeed("virtufin state get chain across-reboot | grep -q kept")
    machine.succeed("virtufin state get chain acknowledged | grep -q before-kill")
    machine.wait_until_succeeds(
        f"virtufin ws list | grep '\"id\":\"{conn}\"' | grep -q '\"status\":\"connected\"'",
        timeout=60,
    )
    assert machine.succeed(f"virtufin ws send {conn} still-there").strip() == "still-there"
    machine.wait_until_succeeds(
        f"virtufin workers list | grep '\"id\":\"{worker}\"' | grep -q '\"status\":\"running\"'",
        timeout=60,
    )
    answers("after-reboot")

with subtest("systemd-analyze security: exposure of each unit at most 2.0"):
    units = UNITS + (["virtufin-daprd"] if DAPR else [])
    for unit in units:
        out = machine.succeed(f"systemd-analyze security {unit}.service --no-pager")
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, f"no exposure level in {out!r}"
        score = float(match.group(1))
        print(f"{unit}: exposure {score}")
        assert score <= 2.0, f"{unit}: exposure {score} > 2.0"
