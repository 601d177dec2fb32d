# The Debian package's dapr backend against the NixOS module's, for the same
# deployment (the case stack/dapr, rendered by NixOS): the repository's
# systemd/virtufin-daprd.service, packaging/dapr/debian/ (its ExecStartPre,
# its health wait, the api's drop-in and environment) and the package's
# assets (services/cli/Cargo.toml). "Shaped exactly like" means: the same
# daprd arguments (the binary and --resources-path are where each system
# keeps them), the same components once the placeholders are filled, the same
# /v1.0/healthz wait, the same [Service] settings (sandboxing included) and
# [Unit] ordering, the api bound to it the same way. A list of failures.
{
  lib,
  repo,
  # render.nix's output for the NixOS host.
  nixos,
}: let
  inherit (import ./unitfile.nix {inherit lib;}) parse values value words environment;
  show = builtins.toJSON;
  same = what: expected: found:
    lib.optional (expected != found)
    "debian: ${what}: expected (NixOS) ${show expected}, found (Debian) ${show found}";
  # Attribute by attribute, so a failure names only what differs.
  sameAttrs = what: expected: found:
    lib.concatMap (k: same "${what} ${k}" (expected.${k} or null) (found.${k} or null))
    (lib.unique (builtins.attrNames expected ++ builtins.attrNames found));
  read = path: builtins.readFile (repo + "/${path}");

  n = parse nixos.units."virtufin-daprd.service".text;
  d = parse (read "systemd/virtufin-daprd.service");
  nApi = parse nixos.units."virtufin-api.service".text;
  dApi = parse (read "packaging/dapr/debian/virtufin-api.conf");
  resourcesScript = read "packaging/dapr/debian/daprd-resources";
  healthyScript = read "packaging/dapr/debian/daprd-healthy";

  # --- the package's files, from cargo-deb's metadata -----------------------
  deb = (builtins.fromTOML (read "services/cli/Cargo.toml")).package.metadata.deb;
  # Installed path -> source (relative to the repository); a glob's files
  # are listed by the folder they land in.
  installed = lib.listToAttrs (map (a: let
    src = lib.removePrefix "../../" (builtins.elemAt a 0);
    dest = builtins.elemAt a 1;
  in
    lib.nameValuePair "/${
      if lib.hasSuffix "/" dest && !(lib.hasInfix "*" src)
      then dest + baseNameOf src
      else dest
    }"
    src)
  deb.assets);
  daprdUnitEntry = lib.findFirst (u: u.unit-name == "virtufin-daprd") null deb.systemd-units;

  # --- daprd's command line ----------------------------------------------
  dArgv = lib.filter (s: s != "") (lib.splitString " " (value d "Service" "ExecStart"));
  after = argv: flag: let
    i = lib.lists.findFirstIndex (a: a == flag) null argv;
  in
    if i == null
    then null
    else builtins.elemAt argv (i + 1);
  # The binary and the resources folder are each system's own places.
  shape = argv:
    map (a:
      if a == builtins.head argv
      then "BINARY"
      else if a == after argv "--resources-path"
      then "RESOURCES"
      else a)
    argv;
  resources = after dArgv "--resources-path";

  # --- the components ExecStartPre renders ------------------------------------
  # The script's own substitutions: s|@NAME@|$VARIABLE|g, and the variables
  # it sets itself (NAME=value lines).
  substitutions =
    map (m: {
      placeholder = builtins.elemAt m 0;
      variable = builtins.elemAt m 1;
    })
    (builtins.filter builtins.isList (builtins.split "s[|](@[A-Z_]+@)[|][$]([A-Za-z_]+)[|]g" resourcesScript));
  scriptVars =
    lib.listToAttrs (map (m: lib.nameValuePair (builtins.elemAt m 0) (builtins.elemAt m 1))
      (builtins.filter builtins.isList (builtins.split "\n([a-z_]+)=([^\n]*)" resourcesScript)));
  dEnv = environment d;
  varValue = v: dEnv.${v} or scriptVars.${v} or "@unset ${v}@";
  outDir = scriptVars.out or null;
  sourceDir = scriptVars.src or null;
  rendered = lib.mapAttrs' (file: _:
    lib.nameValuePair "${lib.removeSuffix ".json" file}.yaml"
    (builtins.fromJSON (builtins.replaceStrings (map (s: s.placeholder) substitutions) (map (s: varValue s.variable) substitutions)
        (read "packaging/dapr/resources/${file}"))))
  (lib.filterAttrs (f: _: lib.hasSuffix ".json" f) (builtins.readDir (repo + "/packaging/dapr/resources")));

  # --- [Service] ------------------------------------------------------------
  # Where the two differ by design: paths (ExecStart, ExecStartPost,
  # LoadCredential's source, NixOS's PATH), and the Debian unit renders the
  # components at start (ExecStartPre, the placeholders' Environment=).
  ownKeys = ["ExecStart" "ExecStartPre" "ExecStartPost" "Environment" "LoadCredential"];
  keys = entries: lib.unique (map (e: e.key) (lib.filter (e: e.section == "Service") entries));
  normal = v:
    {
      yes = "true";
      no = "false";
    }
    .${
      v
    }
    or v;
  settings = entries: lib.genAttrs (lib.subtractLists ownKeys (keys entries)) (k: map normal (words entries "Service" k));
  credentialNames = entries: map (l: builtins.head (lib.splitString ":" l)) (values entries "Service" "LoadCredential");
  postArgv = lib.splitString " " (toString (value d "Service" "ExecStartPost"));
  nHealthy = toString (nixos.storeFiles.${value n "Service" "ExecStartPost"} or "");
  # The health wait's budget: tries and interval.
  budget = text: {
    tries = builtins.match ".*[$][(]seq ([0-9]+)[)].*" text;
    interval = builtins.match ".*sleep ([0-9.]+)\n.*" text;
  };

  # NixOS's local Valkey unit is the Debian package's store unit.
  debianStore = u:
    if u == "redis-virtufin.service"
    then ["valkey-server.service" "redis-server.service"]
    else [u];
  dApiEnv = lib.listToAttrs (map (l: let
    kv = builtins.match "([A-Z_]+)=(.*)" l;
  in
    lib.nameValuePair (builtins.elemAt kv 0) (builtins.elemAt kv 1))
  (lib.filter (l: builtins.match "[A-Z_]+=.*" l != null) (lib.splitString "\n" (read "packaging/dapr/debian/api.env"))));
  apiDaprEnv = env: lib.filterAttrs (k: _: lib.elem k ["VIRTUFIN_BACKEND" "DAPR_HOST" "DAPR_GRPC_PORT" "DAPR_HTTP_PORT"]) env;
in
  # daprd's arguments.
  same "virtufin-daprd.service ExecStart= (binary and --resources-path aside)" (shape nixos.daprd.argv) (shape dArgv)
  ++ same "daprd's binary is where the README puts it" "/usr/local/bin/daprd" (builtins.head dArgv)
  ++ same "ExecStartPre= renders the components into --resources-path" [resources "/usr/lib/virtufin/daprd-resources"] [outDir (value d "Service" "ExecStartPre")]
  # The components.
  ++ sameAttrs "the components (packaging/dapr/resources as ExecStartPre renders them):" nixos.daprd.components rendered
  ++ same "ExecStartPre= reads the resources the package installs" (installed."${sourceDir}/" or null) "packaging/dapr/resources/*.json"
  ++ same "credentials" (credentialNames n) (credentialNames d)
  ++ same "the secret store's file is installed as a conffile" true (builtins.elem "/etc/virtufin/dapr-secrets.json" deb.conf-files && installed ? "/etc/virtufin/dapr-secrets.json")
  # Everything else in [Service], sandboxing included.
  ++ sameAttrs "[Service] (paths and the rendering at start aside)" (settings n) (settings d)
  # NixOS adds PATH; the Debian unit has the placeholders' values.
  ++ sameAttrs "Environment=" (removeAttrs (environment n) ["PATH"]) (lib.filterAttrs (k: _: !(lib.hasPrefix "VIRTUFIN_DAPR_" k)) dEnv)
  # The health wait.
  ++ same "ExecStartPost= polls /v1.0/healthz on daprd's HTTP port" ["/usr/lib/virtufin/daprd-healthy" (after nixos.daprd.argv "--dapr-http-port")] postArgv
  ++ same "the health wait asks for /v1.0/healthz on 127.0.0.1" [true true] [(lib.hasInfix "http://127.0.0.1:" nHealthy && lib.hasInfix "/v1.0/healthz" nHealthy) (lib.hasInfix "/dev/tcp/127.0.0.1/$port" healthyScript && lib.hasInfix "GET /v1.0/healthz " healthyScript)]
  ++ same "the health wait's tries and interval" (budget nHealthy) (budget healthyScript)
  # [Unit] and [Install].
  ++ lib.concatMap (k: same "[Unit] ${k}=" (lib.sort lib.lessThan (lib.concatMap debianStore (words n "Unit" k))) (lib.sort lib.lessThan (words d "Unit" k))) ["After" "Before" "Description" "Documentation"]
  ++ same "[Unit] Wants= the store (NixOS: in the unit; Debian: postinst's drop-in for virtufin-daprd)" ["redis-virtufin.service"] (words n "Unit" "Wants")
  ++ same "packaging/debian/postinst's store drop-in says Wants=, not Requires=" true (lib.hasInfix "[Unit]\\nWants=%s\\nAfter=%s" (read "packaging/debian/postinst"))
  ++ same "packaging/debian/postinst writes the store's drop-in for virtufin-daprd" true (lib.hasInfix "for unit in virtufin-api virtufin-daprd; do" (read "packaging/debian/postinst"))
  ++ same "[Install] WantedBy=" (words n "Install" "WantedBy") (words d "Install" "WantedBy")
  # The api bound to it.
  ++ same "the api's Requires=" (words nApi "Unit" "Requires") (words dApi "Unit" "Requires")
  ++ same "the api's After= virtufin-daprd" true (builtins.elem "virtufin-daprd.service" (words dApi "Unit" "After") && builtins.elem "virtufin-daprd.service" (words nApi "Unit" "After"))
  ++ same "the api's environment for daprd" (apiDaprEnv (environment nApi)) dApiEnv
  ++ same "the api's drop-in reads that environment after /etc/virtufin/api.env" ["/usr/share/virtufin/dapr/api.env"] (values dApi "Service" "EnvironmentFile")
  # The package carries it all.
  ++ same "files the package installs" {
    "/usr/lib/virtufin/daprd-resources" = "packaging/dapr/debian/daprd-resources";
    "/usr/lib/virtufin/daprd-healthy" = "packaging/dapr/debian/daprd-healthy";
    "/usr/share/virtufin/dapr/api.env" = "packaging/dapr/debian/api.env";
    "/usr/share/virtufin/dapr/virtufin-api.conf" = "packaging/dapr/debian/virtufin-api.conf";
  } (lib.filterAttrs (p: _: lib.hasPrefix "/usr/lib/virtufin/" p || lib.hasPrefix "/usr/share/virtufin/dapr/" p && !(lib.hasInfix "resources" p)) installed)
  ++ same "virtufin-daprd.service is a packaged unit, not enabled or started by the package" {
    unit-scripts = "../../systemd";
    enable = false;
    start = false;
  } (removeAttrs (
    if daprdUnitEntry == null
    then {}
    else daprdUnitEntry
  ) ["unit-name"])
