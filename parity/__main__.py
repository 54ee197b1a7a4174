"""``python -m parity``: run every discovered parity case and print the table.

Exit status: 0 when every case that ran passed (skipped cases are listed with their reason; cases marked
as known issues may fail, shown as XFAIL), 1 otherwise (a FAIL, an ERROR, or an XPASS).
"""

from __future__ import annotations

import argparse
import sys
import time

from .runner import discover, run_all


def _fmt(x):
    return "-" if x is None or x != x else f"{x:.2e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--keyword", default=None,
                        help="only cases whose name, entry or reference contains this string")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--family", default=None, help="only cases of this family (cases_<family>.py)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print skipped cases one by one")
    parser.add_argument("--backend", action="append", choices=["jax", "bridge_flat", "bridge_simple"],
                        help="only these implementations of ours (repeatable; default: all)")
    args = parser.parse_args(argv)

    cases = discover(args.keyword, backends=args.backend)
    if args.family:
        cases = [c for c in cases if c.family == args.family]
    if args.list:
        for c in cases:
            missing = c.missing()
            flag = f"  [skip: {missing}]" if missing else ""
            print(f"{c.name:<52} {c.family:<8} {c.reference.name:<44} {c.problem:<10} {c.dtype}{flag}")
            if c.note:
                print(f"{'':<52} {c.note}")
        print(f"{len(cases)} cases")
        return 0

    header = (f"{'case':<52} {'reference':<44} {'problem':<10} {'dtype':<7} {'max abs':>9} {'max rel':>9} "
              f"{'tolerance':<24} {'wrong/tol':>9} {'status':<6}")
    print(header)
    print("-" * len(header))

    def show(r):
        if r.status == "SKIP" and not args.verbose:
            return
        c = r.case
        ratio = "-" if r.wrong_ratio is None else f"{r.wrong_ratio:.1e}"
        print(f"{c.name:<52} {c.reference.name[:44]:<44} {c.problem:<10} {c.dtype:<7} {_fmt(r.max_abs):>9} "
              f"{_fmt(r.max_rel):>9} {r.tolerance_str():<24} {ratio:>9} {r.status:<6}"
              + (f"  {r.reason}" if r.reason else ""), flush=True)

    t0 = time.perf_counter()
    results = run_all(cases, on_result=show)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR", "XFAIL", "XPASS", "SKIP")}
    print("-" * len(header))
    skipped = {}
    for r in results:
        if r.status == "SKIP":
            skipped.setdefault(r.reason, []).append(r.case.name)
    for reason, names in skipped.items():
        print(f"SKIP {len(names):3d} case(s): {reason}" + ("" if args.verbose else f"  (e.g. {names[0]})"))
    print(f"{len(results)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" in {time.perf_counter() - t0:.1f} s")
    return 1 if counts["FAIL"] or counts["ERROR"] or counts["XPASS"] else 0


if __name__ == "__main__":
    sys.exit(main())
