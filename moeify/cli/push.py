"""`moeify push`: publish a converted or merged model folder on the Hub."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a converted model to the Hugging Face Hub",
        description="Create the Hub repository REPO (if needed) and upload every file of OUT, model card included.",
    )
    p.add_argument("output", metavar="OUT", help="a folder written by moeify convert")
    p.add_argument("repo", metavar="REPO", help="Hub repository id, org/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..io.hub import push_to_hub

    url = push_to_hub(args.output, args.repo, private=args.private, revision=args.revision, progress=not args.quiet)
    print(f"Pushed {args.output} to {url}")
    return 0
