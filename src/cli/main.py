"""The `gridserve` command line: every subcommand's flags, and the dispatch that turns failures into one line."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from gridserve.cli import admin, machine
from gridserve.cli.headclient import DEFAULT_HEAD, DEFAULT_STATE_DIR, CliError, Head
from gridserve.common.errors import ConfigError
from gridserve.common.security import add_security_args, security_from_args

ROLES = {
    "head": "the head controller (deployments, placement, routes; starts the HTTP proxy)",
    "scheduler": "a node scheduler (one per machine; runs the replicas the head places)",
    "replica": "one model replica process (normally started by a scheduler)",
    "proxy": "the HTTP proxy (normally started by the head)",
    "simulate": "many simulated schedulers in one process against a real head (scale tests)",
}
ROLE_MODULES = {"simulate": "gridserve.scheduler.simulate"}  # roles whose main is not gridserve.<role>.__main__


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _output(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--output", "-o", choices=("table", "json"), default="table",
                    help="table for people (default) or json for programs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridserve", description="A distributed model-serving cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role, text in ROLES.items():
        sub.add_parser(role, help=f"run {text}; see `gridserve {role} --help`", add_help=False)
    add_admin_parsers(sub)
    add_machine_parsers(sub)
    add_up_parser(sub)
    return p


def add_admin_parsers(sub) -> None:
    def admin_cmd(name: str, help_text: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--head", default=DEFAULT_HEAD, help=f"the head's gRPC address (default {DEFAULT_HEAD})")
        sp.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="the head's state dir, where its cluster token is found when no token flag is "
                             f"given (default ./{DEFAULT_STATE_DIR})")
        add_security_args(sp)
        _output(sp)
        sp.set_defaults(func=func)
        return sp

    admin_cmd("status", "show nodes, deployments, replicas and the proxy", admin.cmd_status)
    admin_cmd("nodes", "list the nodes (schedulers) and their resources", admin.cmd_nodes)
    admin_cmd("deployments", "list the deployments and how many replicas are ready", admin.cmd_deployments)
    sp = admin_cmd("replicas", "list the replicas and their states", admin.cmd_replicas)
    sp.add_argument("--model", default="", help="only this model's replicas")
    sp = admin_cmd("deploy", "deploy a model from the catalog (or replace its deployment)", admin.cmd_deploy)
    sp.add_argument("model", help="model name from model_configs.json (see `gridserve models`)")
    sp.add_argument("--replicas", type=positive_int, default=None,
                    help="a fixed count of replicas, even when the catalog entry has an autoscaling block "
                         "(default 1, or autoscaled by that block)")
    sp.add_argument("--node", default="", help="place replicas only on this node (see `gridserve nodes`)")
    g = sp.add_argument_group("autoscaling (any of these, or an 'autoscaling' block in the model's catalog entry, "
                              "makes the deployment autoscaled; given ones override the block; see "
                              "docs/autoscaling.md)")
    for flag, kind, text in AUTOSCALING_FLAGS:
        g.add_argument(flag, type=kind, default=None, help=text)
    sp = admin_cmd("scale", "change the replica count of a deployed model", admin.cmd_scale)
    sp.add_argument("model")
    sp.add_argument("replicas", type=positive_int, help="desired replicas")
    sp = admin_cmd("undeploy", "remove a deployment and stop its replicas", admin.cmd_undeploy)
    sp.add_argument("model")
    admin_cmd("models", "list the models the catalog offers and which are deployed", admin.cmd_models)
    sp = admin_cmd("logs", "print a replica's log (relayed by the head from its node)", admin.cmd_logs)
    sp.add_argument("replica", help="replica id (see `gridserve replicas`)")
    sp.add_argument("--follow", "-f", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    sp.add_argument("--tail", type=int, default=-1, help="only the last N lines (default: the whole log)")
    sp.add_argument("--node", default="", help="the node the replica ran on, for one the head no longer tracks")
    from gridserve.cli.pull import cmd_pull
    sp = admin_cmd("pull", "fetch a hub model into the HF cache of the nodes, ahead of a deploy", cmd_pull)
    sp.add_argument("model", help="a catalog model with a hub source, or a hub repo id (org/name)")
    sp.add_argument("--node", default="", help="only this node (default: every alive node)")
    sp.add_argument("--revision", default="", help="branch, tag or commit (default: the catalog's, or main)")


AUTOSCALING_FLAGS = (
    ("--min-replicas", int, "fewest replicas (0: scale to zero when idle; default 1)"),
    ("--max-replicas", int, "most replicas (default 1)"),
    ("--initial-replicas", int, "replicas at deploy (default: min-replicas)"),
    ("--target-ongoing-requests", float, "ongoing + queued requests per replica to aim for (default 2)"),
    ("--upscale-delay", float, "seconds a higher count must be wanted before scaling up (default 30)"),
    ("--downscale-delay", float, "seconds a lower count must be wanted before scaling down (default 600)"),
    ("--look-back-period", float, "seconds the load is averaged over (default 30)"),
)


def add_machine_parsers(sub) -> None:
    sp = sub.add_parser("hardware", help="show this machine's CPUs, memory, disk and the GPUs torch sees")
    sp.add_argument("--path", default=".", help="whose filesystem the disk line describes (default .)")
    _output(sp)
    sp.set_defaults(func=machine.cmd_hardware)
    sp = sub.add_parser("recommend", help="which catalog models fit this machine, best first")
    sp.add_argument("--model-configs", default="", help="model catalog (default: the repo's model_configs.json)")
    _output(sp)
    sp.set_defaults(func=machine.cmd_recommend)


def add_up_parser(sub) -> None:
    from gridserve.cli.up import cmd_up

    sp = sub.add_parser("up", help="start a local cluster (head, proxy, one scheduler) and deploy a model",
                        description="Start a head (which starts the proxy) and one local scheduler, deploy a "
                                    "model, wait until it is READY, then stay in the foreground; Ctrl-C stops "
                                    "everything.")
    sp.add_argument("--model", default="", help="model to deploy (default: the catalog's default_model)")
    sp.add_argument("--replicas", type=positive_int, default=1, help="replicas to deploy (default 1)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address of every process (default 127.0.0.1)")
    sp.add_argument("--grpc-port", type=int, default=50051, help="the head's gRPC port (default 50051)")
    sp.add_argument("--http-port", type=int, default=8000, help="the proxy's HTTP port (default 8000)")
    sp.add_argument("--state-dir", default=".gridserve/state", help="head state (default ./.gridserve/state)")
    sp.add_argument("--work-dir", default=".gridserve/node", help="scheduler work dir (default ./.gridserve/node)")
    sp.add_argument("--num-cpus", type=positive_float, default=None, help="CPUs the local node offers (default: all)")
    sp.add_argument("--model-configs", default="", help="model catalog (default: the repo's model_configs.json)")
    sp.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                    help="API keys for the proxy, one per line; /v1/* then needs Authorization: Bearer <key>")
    sp.add_argument("--admin-key-file", action="append", default=[], metavar="PATH",
                    help="dashboard admin keys, one per line: needed to deploy, scale and undeploy from "
                         "/dashboard")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for the model to become READY (default 600)")
    sp.set_defaults(func=cmd_up)


def run_role(role: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(ROLE_MODULES.get(role, f"gridserve.{role}.__main__"))
    except ImportError as e:
        print(f"gridserve {role}: not available in this installation: {e}", file=sys.stderr)
        return 1
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ROLES:
        return run_role(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "cluster_token_file") and hasattr(args, "head"):
            args.head = Head(args.head, security_from_args(args, state_dir=Path(args.state_dir)))
        return args.func(args)
    except CliError as e:
        print(e, file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:  # a state/work dir that cannot be created, a log that cannot be opened ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gridserve status | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
