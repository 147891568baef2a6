"""``kvbridge deploy k8s --config cluster.yaml [--profile efa|gb200] [--out DIR]``.

Without ``--out`` the manifests go to stdout as one YAML stream (``| kubectl apply -f -``);
with it, one file per object, numbered in apply order (``kubectl apply -f DIR``).
"""

from __future__ import annotations

import argparse
import sys

from kvbridge.config import ConfigError
from kvbridge.deploy.cluster_config import PROFILES, load_cluster_config
from kvbridge.deploy.k8s import manifests, to_yaml, write_manifests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbridge deploy", description="Generate deployment manifests.")
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    k8s = sub.add_parser(
        "k8s",
        help="Kubernetes manifests: etcd, NATS, frontend, prefill and decode workers, engine ConfigMap",
        description="Write the Kubernetes manifests of a whole kvbridge deployment. "
        "See docs/deploy-aws-efa.md and docs/deploy-gb200.md.",
    )
    k8s.add_argument("--config", required=True, metavar="cluster.yaml", help="the cluster description")
    k8s.add_argument(
        "--profile", choices=PROFILES, default=None, help="hardware profile (overrides `profile:` in cluster.yaml)"
    )
    k8s.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="write one file per object into DIR (default: one YAML stream on stdout)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_cluster_config(args.config, profile=args.profile)
        objs = manifests(cfg)
    except ConfigError as e:
        print(f"kvbridge deploy: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(to_yaml(objs))
        return 0
    paths = write_manifests(objs, args.out)
    what = f"profile: {cfg.profile or 'none'}"
    if cfg.multinode:
        what += f", multinode decode: {cfg.decode.multinode.nodes} pods per worker"
    print(f"wrote {len(paths)} manifests to {args.out} ({what})")
    for p in paths:
        print(f"  {p}")
    print(f"apply with: kubectl apply -n {cfg.namespace} -f {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
