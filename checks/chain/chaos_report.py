"""Checks virtufin-chaosload's report (its last JSON line) for the chain
test's chaos pass and the multi-host test: prints the accounting and exits
1 unless writes and events were acknowledged and none of them was lost
(duplicates are counted, not failed: delivery is at least once). With
--hosts, the worker's answers must also come from each of those hosts (the
last ':'-part of each answer's CloudEvent source).

    python3 checks/chain/chaos_report.py [--hosts h1,h2,h3] REPORT
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="")
    ap.add_argument("report")
    args = ap.parse_args()
    try:
        r = json.loads(args.report.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print("   no report from virtufin-chaosload: %r" % args.report[:300])
        return 1
    w, e = r["writes"], r["events"]
    d, a = e["delivered"], e["answered"]
    print("   writes: %d acknowledged (%d not), %d lost %s, longest gap %d ms" % (
        w["acknowledged"], w["not_acknowledged"], w["lost"], w["lost_examples"], w["longest_gap_ms"]))
    print("   events: %d acknowledged (%d not), longest gap %d ms" % (
        e["acknowledged"], e["not_acknowledged"], e["longest_gap_ms"]))
    print("   delivered to the audit group: %d unique, %d lost %s, %d duplicates" % (
        d["delivered_unique"], d["lost"], d["lost_examples"], d["duplicates"]))
    print("   answered by the worker: %d unique, %d lost %s, %d duplicates" % (
        a["delivered_unique"], a["lost"], a["lost_examples"], a["duplicates"]))
    print("   settled %d ms after the load stopped" % r["settled_in_ms"])
    ok = (w["acknowledged"] > 0 and e["acknowledged"] > 0
          and w["lost"] == 0 and d["lost"] == 0 and a["lost"] == 0)
    hosts = [h for h in args.hosts.split(",") if h]
    if hosts:
        by = {k.rsplit(":", 1)[-1]: v for k, v in a.get("by_source", {}).items()}
        print("   answers by host: %s" % ", ".join("%s %d" % kv for kv in sorted(by.items())))
        ok = ok and all(by.get(h, 0) > 0 for h in hosts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
