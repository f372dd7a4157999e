"""`flowopd serve`: a reward over HTTP, speaking the remote reward's JSON protocol (rewards/remote.py).

    flowopd serve REWARD --port PORT [--spec SPEC [--task TASK]] [--host 127.0.0.1]
    flowopd serve reward-server --upstream URL --kind geneval|deqa --port PORT [--host 127.0.0.1]

REWARD: a reward of the registry, scored in this process (rewards/server.py); reward-server: the adapter in front of
Flow-GRPO's reward-server (rewards/reward_server.py). A bad argument is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from flowopd.rewards.remote import RemoteRewardError
from flowopd.rewards.reward_server import KINDS, RewardServerAdapter
from flowopd.rewards.server import MAX_REQUEST_MB, RewardHTTPServer, in_process_scorer
from flowopd.spec.errors import SpecError

ADAPTER = "reward-server"


def cmd_serve(args) -> int:
    try:
        if args.reward == ADAPTER:
            if not (args.upstream and args.kind) or args.spec or args.task:
                raise ValueError(f"{ADAPTER} takes --upstream URL and --kind geneval|deqa (no --spec, --task)")
            scorer = RewardServerAdapter(args.upstream, args.kind, args.timeout, args.retries)
            what = f"{args.kind} of {ADAPTER} at {scorer.upstream.where}"
        else:
            if args.upstream or args.kind:
                raise ValueError(f"--upstream and --kind are for {ADAPTER}")
            scorer = in_process_scorer(args.reward, args.spec, args.task)
            what = f"reward {args.reward!r}"
        server = RewardHTTPServer((args.host, args.port), scorer, args.max_request_mb, quiet=args.quiet)
    except (ValueError, SpecError, OSError, RemoteRewardError) as err:
        print(f"flowopd serve: {err}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flowopd serve: listening on {args.host}: whoever reaches this port can use it (no authentication)",
              file=sys.stderr)
    print(f"serving {what} on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a reward over HTTP (the remote reward's JSON protocol)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reward", help=f"a reward of the registry (ocr, objects, quality, pickscore), or {ADAPTER}")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--spec", help="the spec whose world the reward scores in (default: the default tiny world)")
    parser.add_argument("--task", help="the spec's task whose reward settings to use (pickscore, scene OCR)")
    parser.add_argument("--upstream", help=f"{ADAPTER}: its URL, e.g. http://127.0.0.1:18085")
    parser.add_argument("--kind", choices=KINDS, help=f"{ADAPTER}: which scorer it runs")
    parser.add_argument("--timeout", type=float, default=100.0,
                        help=f"{ADAPTER}: seconds per upstream request (keep it below the spec's remote.timeout)")
    parser.add_argument("--retries", type=int, default=0,
                        help=f"{ADAPTER}: further attempts at a failed upstream request (the client retries too)")
    parser.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB, help="larger requests are refused")
    parser.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    parser.set_defaults(func=cmd_serve)
