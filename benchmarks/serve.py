"""Entry script for the serving benchmark (the same program as `lorafleet bench serve`).

    python benchmarks/serve.py --json docs/results/serve-DATE.json --plot-dir docs/img
    python benchmarks/serve.py --report docs/results/serve-*.json --update-doc docs/benchmarks.md
"""
import argparse
import sys

from lorafleet.bench import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=serve.__doc__.splitlines()[0])
    serve.add_arguments(parser)
    sys.exit(serve.run(parser.parse_args()))
