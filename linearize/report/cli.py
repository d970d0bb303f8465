"""`linearize report DIR`: parser and run."""


def add(sub):
    p = sub.add_parser("report", help="one self-contained HTML page with plots of convert, eval and bench results",
                       description="Write DIR/report.html (figures embedded) and DIR/report/*.png from convert.json, "
                                   "curves.json, eval.json and bench.json, whichever exist.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--screenshot", action="store_true",
                   help="also render the page with headless Chromium to DIR/report/screenshot.png")
    p.set_defaults(run=run)


def run(args):
    from .page import build_report

    out = build_report(args.path)
    print(f"report written to {out}")
    if args.screenshot:
        from .screenshot import screenshot

        print(f"screenshot: {screenshot(out, out.parent / 'report' / 'screenshot.png')}")
