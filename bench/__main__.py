from rnnserve_bench.cli import main

raise SystemExit(main(prog="python -m rnnserve_bench"))
