# What one evaluated NixOS configuration puts on a host, as plain data: for
# checks.nix, and for anything that wants to write a host out (every text
# is a string, every referenced store file is listed with its content).
#
# Units are rendered by NixOS itself (systemd.units.<name>.text, from
# nixos/lib/systemd-lib.nix). Where NixOS would install each one is decided
# as generateUnits does (its shell script cannot run here): a unit that a
# package in systemd.packages also ships becomes the drop-in
# <unit>.d/overrides.conf beside the packaged file, any other is the unit.
{
  lib,
  # Where the store's files really are when it is not the system's (a
  # chroot store, `nix --store DIR`): DIR, prefixed to every store path read.
  storeRoot ? "",
}: evaluated: let
  inherit (evaluated) config;
  inherit (builtins) storeDir fromJSON;
  pathExists = path: builtins.pathExists (storeRoot + path);
  readFile = path: builtins.readFile (storeRoot + path);

  ours = name: lib.hasPrefix "virtufin-" name || name == "redis-virtufin.service";

  # The packaged unit files, by name (the stand-in packages carry them).
  packaged = lib.foldl' (acc: pkg: acc // (pkg.systemdUnits or {})) {} config.systemd.packages;

  units = lib.mapAttrs (name: unit: let
    shipped = packaged.${name} or null;
    dropin = shipped != null && (unit.overrideStrategy or "asDropinIfExists") == "asDropinIfExists";
  in {
    inherit (unit) text wantedBy;
    inherit dropin;
    packaged = shipped;
    # The path of NixOS's text under /etc/systemd/system.
    path =
      if dropin
      then "${name}.d/overrides.conf"
      else name;
    # The unit's definition, for reading values without parsing the text.
    service = config.systemd.services.${lib.removeSuffix ".service" name} or null;
  }) (lib.filterAttrs (name: unit: ours name && unit.enable) config.systemd.units);

  # Store paths a text mentions (as plain strings: they name attributes).
  storePathsIn = text:
    map (m: builtins.unsafeDiscardStringContext (builtins.head m)) (builtins.filter builtins.isList
      (builtins.split "(${storeDir}/[0-9a-z]{32}-[-._+?=A-Za-z0-9]+)" text));

  # Every store file reachable from the units' texts (stand-in packages
  # have no file: they are listed in `packages`).
  reachable = builtins.genericClosure {
    startSet = map (key: {inherit key;}) (lib.unique (lib.concatMap (u: storePathsIn u.text) (lib.attrValues units)));
    operator = item:
      lib.optionals (pathExists item.key)
      (map (key: {inherit key;}) (storePathsIn (readFile item.key)));
  };
  storeFiles =
    lib.listToAttrs (map (i: lib.nameValuePair i.key (builtins.unsafeDiscardStringContext (readFile i.key)))
      (builtins.filter (i: pathExists i.key) reachable));
  packages = map (i: i.key) (builtins.filter (i: !(pathExists i.key)) reachable);

  # daprd: its command line and the components in --resources-path (a
  # linkFarm of yaml.generate files; each reads as the value formats.nix
  # was given, the JSON that remarshal's json2yaml would turn into YAML).
  daprd = let
    unit = units."virtufin-daprd.service" or null;
    argv = lib.filter (s: s != "") (lib.splitString " " unit.service.serviceConfig.ExecStart);
    after = flag: let
      i = lib.lists.findFirstIndex (a: a == flag) null argv;
    in
      if i == null
      then null
      else builtins.elemAt argv (i + 1);
    resources = builtins.unsafeDiscardStringContext (toString (after "--resources-path"));
    # A store file's JSON manifest (pkgs.nix), or null.
    manifest = path:
      if storeFiles ? ${path}
      then let
        tried = builtins.tryEval (fromJSON storeFiles.${path});
      in
        if tried.success && builtins.isAttrs tried.value
        then tried.value
        else null
      else null;
    farm = manifest resources;
    # null where the file is not what formats.yaml generates.
    component = path: let
      drv = manifest path;
    in
      if drv != null && drv.fake or "" == "runCommand" && lib.hasInfix "json2yaml" (drv.script or "") && drv.env ? value
      then fromJSON drv.env.value
      else null;
  in
    if unit == null
    then null
    else {
      inherit argv after resources;
      # null where --resources-path is not a linkFarm of such files.
      components =
        if farm != null && farm.fake or "" == "linkFarm"
        then lib.mapAttrs (_: component) farm.entries
        else null;
    };
in {
  inherit units storeFiles packages daprd;
  assertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
  # The redis module's enabled servers (none with an external Valkey).
  redisServers = builtins.attrNames (lib.filterAttrs (_: s: s.enable) config.services.redis.servers);
  # The texts of the host's other units (a case's own Valkey or Sentinel),
  # and a reader of the store files they name (null when not readable).
  otherUnits = lib.mapAttrs (_: u: u.text) (lib.filterAttrs (name: u: !(ours name) && u.enable) config.systemd.units);
  readStoreFile = path: let
    p = builtins.unsafeDiscardStringContext path;
  in
    if lib.hasPrefix "${storeDir}/" p && pathExists p
    then builtins.unsafeDiscardStringContext (readFile p)
    else null;
  firewall.tcp = lib.unique (lib.sort lib.lessThan config.networking.firewall.allowedTCPPorts);
  # The unit files as NixOS lays them out under /etc/systemd/system (the
  # packaged ones are links to the package there; here their text), by path
  # relative to the root. Store paths they name are in storeFiles; units'
  # wantedBy says which .wants links NixOS adds.
  files =
    lib.mapAttrs' (name: text: lib.nameValuePair "etc/systemd/system/${name}" text)
    (lib.filterAttrs (name: _: units ? ${name}) packaged)
    // lib.mapAttrs' (name: u: lib.nameValuePair "etc/systemd/system/${u.path}" u.text) units;
}
