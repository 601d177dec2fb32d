# A NixOS configuration as the files a host would have after
# `nixos-rebuild switch`, as plain data for checks/nixos/container/host.py,
# which writes them into a container root.
#
# - units: every unit this configuration adds over a bare NixOS (the
#   evaluation of no module at all) — ours, the redis module's, the test
#   node's own — by the path NixOS would give it under /etc/systemd/system
#   (render.nix decides unit file vs drop-in); and the .wants/.requires/
#   .upholds links NixOS's generateUnits makes from wantedBy, requiredBy
#   and upheldBy.
# - storeFiles: every store file the units and /etc files name, with its
#   text (writeText and friends; the stand-in builders' JSON manifests).
# - packages: every store path named that has no file here (a package of
#   nixpkgs or the flake): host.py maps each onto this machine's files.
# - etc, hosts, users, groups, systemPackages: what NixOS's etc, networking,
#   users-groups and system-path modules would install.
{
  lib,
  storeRoot ? "",
}: {
  # The configuration (lib.evalModules' result).
  evaluated,
  # A bare NixOS (the evaluation of no module): its units and /etc files
  # are NixOS's own, not this configuration's, and are left out.
  base,
}: let
  inherit (evaluated) config;
  inherit (builtins) storeDir;
  render = import ./render.nix {inherit lib storeRoot;};
  rendered = render evaluated;
  pathExists = path: builtins.pathExists (storeRoot + path);
  readFile = path: builtins.readFile (storeRoot + path);
  plain = builtins.unsafeDiscardStringContext;

  added = lib.filterAttrs (name: u: !(base.config.systemd.units ? ${name}) && u.enable) config.systemd.units;
  # Units render.nix does not write (not ours): the whole text is the unit.
  otherFiles =
    lib.mapAttrs' (name: u: lib.nameValuePair "etc/systemd/system/${name}" u.text)
    (lib.filterAttrs (name: _: !(rendered.units ? ${name})) added);
  links = lib.concatLists (lib.mapAttrsToList (name: u:
    map (target: {
      inherit name target;
      kind = "wants";
    }) (u.wantedBy or [])
    ++ map (target: {
      inherit name target;
      kind = "requires";
    }) (u.requiredBy or [])
    ++ map (target: {
      inherit name target;
      kind = "upholds";
    }) (u.upheldBy or []))
  added);

  etc = lib.mapAttrs' (_: e: lib.nameValuePair e.target (plain (toString e.source))) (lib.filterAttrs (name: e: !(base.config.environment.etc ? ${name}) && e.enable) config.environment.etc);

  storePathsIn = text:
    map (m: plain (builtins.head m)) (builtins.filter builtins.isList
      (builtins.split "(${storeDir}/[0-9a-z]{32}-[-._+?=A-Za-z0-9]+)" text));
  roots = lib.unique (lib.concatMap storePathsIn (builtins.attrValues otherFiles ++ builtins.attrValues etc ++ map (p: "${p}") config.environment.systemPackages));
  reachable = builtins.genericClosure {
    startSet = map (key: {inherit key;}) roots;
    operator = item:
      lib.optionals (pathExists item.key)
      (map (key: {inherit key;}) (storePathsIn (readFile item.key)));
  };
  moreFiles =
    lib.listToAttrs (map (i: lib.nameValuePair i.key (plain (readFile i.key)))
      (builtins.filter (i: pathExists i.key) reachable));
  morePackages = map (i: i.key) (builtins.filter (i: !(pathExists i.key)) reachable);
in {
  files = rendered.files // otherFiles;
  inherit links etc;
  storeFiles = rendered.storeFiles // moreFiles;
  packages = lib.unique (lib.sort lib.lessThan (rendered.packages ++ morePackages));
  systemPackages = map (p: plain "${p}") config.environment.systemPackages;
  hosts = config.networking.extraHosts;
  users = lib.mapAttrs (_: u: {inherit (u) name uid isSystemUser group description;}) (lib.filterAttrs (name: _: !(base.config.users.users ? ${name})) config.users.users);
  groups = lib.mapAttrs (_: g: {inherit (g) name gid;}) (lib.filterAttrs (name: _: !(base.config.users.groups ? ${name})) config.users.groups);
  inherit (rendered) assertions warnings;
}
