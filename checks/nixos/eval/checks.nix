# What must be true of one rendered configuration (render.nix) given its
# case (cases.nix): a list of failures, each naming the configuration, what
# was checked, what was expected and what was found. Empty = it passed.
{
  lib,
  # A string no rendered text or store file may contain (the secret files
  # run.sh made hold it); null skips that check.
  canary ? null,
}: case: r: let
  inherit (builtins) fromJSON elem;
  show = v: builtins.toJSON v;

  # One check: { what; expected; found; ok ? expected == found }.
  check = c:
    lib.optional (!(c.ok or (c.expected == c.found)))
    "${case.name}: ${c.what}: expected ${show c.expected}, found ${show c.found}";
  same = what: expected: found: check {inherit what expected found;};
  sameSet = what: expected: found:
    check {
      inherit what;
      expected = lib.sort lib.lessThan (lib.unique expected);
      found = lib.sort lib.lessThan (lib.unique found);
    };

  # --- the case's expectations, with their defaults ---------------------
  all = ["api" "websocketmanager" "workmanager"];
  services = case.services or all;
  runs = s: elem s services;
  backend = case.backend or "valkey";
  valkeyPort = case.valkeyPort or 6379;
  dapr =
    {
      http = 3500;
      grpc = 50001;
      extraArgs = [];
      secretsFile = null;
    }
    // (case.dapr or {});
  listen = s: (case.listen or {}).${s} or "127.0.0.1";
  http = s:
    (case.http or {}).${s}
    or {
      api = 5001;
      websocketmanager = 5201;
      workmanager = 5101;
    }
    .${
      s
    };
  grpc = s:
    (case.grpc or {}).${s}
    or {
      api = 5002;
      websocketmanager = 5202;
      workmanager = 5102;
    }
    .${
      s
    };
  bracket = a:
    if lib.hasInfix ":" a
    then "[${a}]"
    else a;
  local = a:
    {
      "0.0.0.0" = "127.0.0.1";
      "::" = "::1";
    }
    .${a}
    or a;
  apiHost = case.apiHost or "127.0.0.1";
  apiPort = case.apiPort or (grpc "api");
  password = case.password or null;
  # An external Valkey (valkey.external), as literal expectations:
  # { url (the api's VIRTUFIN_VALKEY_URL), redisHost, meta (daprd's extra
  # component metadata), sentinelPassword (path or null) }; null: local.
  external = case.external or null;
  sentinelPassword =
    if external == null
    then null
    else external.sentinelPassword or null;
  # What reaches a client as credentials: name -> path.
  valkeySecrets =
    lib.optionalAttrs (password != null) {valkey-password = password;}
    // lib.optionalAttrs (sentinelPassword != null) {valkey-sentinel-password = sentinelPassword;};
  online = "network-online.target";
  gateway =
    case.gateway
    or (map (s: {
      name = s;
      host = local (listen s);
      port = grpc s;
    }) (lib.filter (s: s != "api" && runs s) all));

  # --- reading unit texts ------------------------------------------------
  inherit (import ./unitfile.nix {inherit lib;}) parse values value words environment;

  unit = name: r.units.${name} or null;
  storeFile = path:
    if path == null
    then null
    else r.storeFiles.${builtins.unsafeDiscardStringContext path} or null;

  # --- assertions and warnings -----------------------------------------
  matchAll = what: expected: found': let
    # Messages are wrapped: compare with single spaces.
    found = map (f: lib.trim (builtins.replaceStrings ["\n"] [" "] f)) found';
  in
    check {
      what = "${what} (one message containing each expected text, and no other message)";
      expected = expected;
      found = found;
      ok =
        builtins.length expected
        == builtins.length found
        && lib.all (e: builtins.length (lib.filter (f: lib.hasInfix e f) found) >= 1) expected;
    };
  expectedAssertions = case.assertions or [];
  messagesChecks =
    matchAll "failed assertions" expectedAssertions r.assertions
    ++ matchAll "warnings" (case.warnings or []) r.warnings;

  # --- units ---------------------------------------------------------------
  ourUnits =
    lib.concatMap (s: ["virtufin-${s}.service" "virtufin-${s}-http.socket" "virtufin-${s}-grpc.socket"]) services
    ++ lib.optionals (runs "api") (lib.optional (external == null) "redis-virtufin.service" ++ lib.optional (backend == "dapr") "virtufin-daprd.service");

  # What a drop-in may carry (README, "NixOS"): the environment (NixOS
  # adds PATH to it), EnvironmentFile=, LoadCredential=, wantedBy, and
  # for the api Wants=/After= its store or Requires=/After= daprd
  # (Wants=/After= the network with an external Valkey). Everything else —
  # ordering, Type=notify, the watchdog, restart policy, hardening — comes
  # from the packaged unit.
  allowedDropin = s:
    ["Service.Environment" "Service.EnvironmentFile" "Service.LoadCredential" "Install.WantedBy"]
    ++ lib.optionals (s == "api") ["Unit.Requires" "Unit.Wants" "Unit.After"];

  # Socket activation: the packaged socket units (FileDescriptorName=,
  # Service=) under a drop-in that sets ListenStream= from the options and
  # enables them.
  socketChecks = s:
    lib.concatMap (kind: let
      name = "virtufin-${s}-${kind}.socket";
      u = unit name;
      d = parse u.text;
      p = parse u.packaged;
      port =
        if kind == "http"
        then http s
        else grpc s;
    in
      if u == null
      then [
        "${case.name}: ${name}: expected a socket unit, found none"
      ]
      else
        same "${name} is a drop-in over the packaged unit" true (u.dropin && u.packaged != null)
        ++ same "${name} drop-in: ListenStream= (reset, then the options' address and port)" ["" "${bracket (listen s)}:${toString port}"] (values d "Socket" "ListenStream")
        ++ same "${name} drop-in: WantedBy=" ["sockets.target"] (words d "Install" "WantedBy")
        ++ same "${name} packaged: FileDescriptorName=" kind (value p "Socket" "FileDescriptorName")
        ++ same "${name} packaged: Service=" "virtufin-${s}.service" (value p "Socket" "Service")) ["http" "grpc"];

  serviceChecks = s: let
    name = "virtufin-${s}.service";
    u = unit name;
    d = parse u.text;
    p = parse u.packaged;
    env = environment d;
    expectedEnv =
      {
        ASPNETCORE_URLS = "http://${bracket (listen s)}:${toString (http s)}";
        VIRTUFIN_GRPC_HOST = listen s;
        VIRTUFIN_GRPC_PORT = toString (grpc s);
        RUST_LOG = "info";
      }
      // lib.optionalAttrs (s == "api") (
        {VIRTUFIN_BACKEND = backend;}
        // (
          if backend == "valkey"
          then {
            VIRTUFIN_VALKEY_URL =
              if external != null
              then external.url
              else "redis://127.0.0.1:${toString valkeyPort}";
            # Set only with valkey.minReplicas > 0 (case.env says so).
            VIRTUFIN_VALKEY_MIN_REPLICAS = null;
            VIRTUFIN_VALKEY_WAIT_TIMEOUT = null;
            DAPR_GRPC_PORT = null;
          }
          else {
            VIRTUFIN_VALKEY_URL = null;
            DAPR_HOST = "127.0.0.1";
            DAPR_GRPC_PORT = toString dapr.grpc;
            DAPR_HTTP_PORT = toString dapr.http;
          }
        )
      )
      // lib.optionalAttrs (s != "api") {
        VIRTUFIN_API_HOST = apiHost;
        VIRTUFIN_API_GRPC_PORT = toString apiPort;
      }
      // ((case.env or {}).${s} or {});
    execStart = value p "Service" "ExecStart";
    servicesFile = env.SERVICES_CONFIG_PATH or null;
  in
    if u == null
    then []
    else
      same "${name} is a drop-in over the packaged unit" true (u.dropin && u.packaged != null)
      ++ sameSet "${name} drop-in: keys outside what the README lists" []
      (lib.filter (k: !(elem k (allowedDropin s))) (map (e: "${e.section}.${e.key}") d))
      ++ same "${name} drop-in: WantedBy=" ["multi-user.target"] (words d "Install" "WantedBy")
      ++ lib.concatLists (lib.mapAttrsToList (k: v: same "${name} Environment ${k}" v (env.${k} or null)) expectedEnv)
      ++ sameSet "${name} EnvironmentFile=" (lib.toList ((case.environmentFile or {}).${s} or [])) (values d "Service" "EnvironmentFile")
      ++ sameSet "${name} LoadCredential=" ((case.credentials or {}).${s} or []) (values d "Service" "LoadCredential")
      # The packaged unit: kept as the one definition.
      ++ same "${name} packaged: Type=" "notify-reload" (value p "Service" "Type")
      ++ same "${name} packaged: Sockets=" ["virtufin-${s}-http.socket" "virtufin-${s}-grpc.socket"] (words p "Service" "Sockets")
      ++ check {
        what = "${name} packaged: Requires= its socket units";
        expected = ["virtufin-${s}-http.socket" "virtufin-${s}-grpc.socket"];
        found = words p "Unit" "Requires";
        ok = lib.all (x: elem x (words p "Unit" "Requires")) ["virtufin-${s}-http.socket" "virtufin-${s}-grpc.socket"];
      }
      ++ same "${name} packaged: NotifyAccess=" "main" (value p "Service" "NotifyAccess")
      ++ same "${name} packaged: WatchdogSec=" "30s" (value p "Service" "WatchdogSec")
      ++ same "${name} packaged: Restart=" "on-failure" (value p "Service" "Restart")
      ++ lib.concatLists (lib.mapAttrsToList (k: v: same "${name} packaged: ${k}=" v (value p "Service" k)) {
        DynamicUser = "yes";
        NoNewPrivileges = "yes";
        ProtectSystem = "strict";
        ProtectHome = "yes";
        PrivateUsers = "yes";
        CapabilityBoundingSet = "";
        MemoryDenyWriteExecute = "yes";
        RestrictAddressFamilies = "AF_INET AF_INET6 AF_UNIX";
        SystemCallErrorNumber = "EPERM";
      })
      ++ check {
        what = "${name} packaged: ExecStart= is the package's binary";
        expected = "/nix/store/…/bin/virtufin-${s}";
        found = execStart;
        ok = execStart != null && lib.hasPrefix builtins.storeDir execStart && lib.hasSuffix "/bin/virtufin-${s}" execStart;
      }
      ++ (
        if s == "api"
        then
          same "${name} packaged: Before=" ["virtufin-websocketmanager.service" "virtufin-workmanager.service"] (words p "Unit" "Before")
          ++ same "virtufin-api.service drop-in: Requires=" (lib.optional (backend == "dapr") "virtufin-daprd.service") (words d "Unit" "Requires")
          # Wants= Valkey (a restart of Valkey must not restart the api);
          # an external Valkey is no unit: the api waits for the network.
          ++ same "virtufin-api.service drop-in: Wants=" (lib.optional (backend == "valkey") (
            if external != null
            then online
            else "redis-virtufin.service"
          )) (words d "Unit" "Wants")
          ++ sameSet "virtufin-api.service drop-in: After=" (
            lib.optional (external == null) "redis-virtufin.service"
            ++ lib.optional (backend == "dapr") "virtufin-daprd.service"
            ++ lib.optional (external != null && backend == "valkey") online
          ) (words d "Unit" "After")
          ++ check {
            what = "virtufin-api.service SERVICES_CONFIG_PATH is a file in the store";
            expected = "${builtins.storeDir}/…-virtufin-services.json";
            found = servicesFile;
            ok = servicesFile != null && storeFile servicesFile != null;
          }
          ++ lib.optionals (servicesFile != null && storeFile servicesFile != null)
          (same "the api's services file (the Gateway's backends)" gateway
            (map (b: {
                inherit (b) name;
                inherit (b.grpc) host port;
              })
              (fromJSON (storeFile servicesFile)).services))
        else
          check {
            what = "${name} packaged: After= and Wants= the api";
            expected = true;
            found = {
              After = words p "Unit" "After";
              Wants = words p "Unit" "Wants";
            };
            ok = elem "virtufin-api.service" (words p "Unit" "After") && elem "virtufin-api.service" (words p "Unit" "Wants");
          }
          ++ lib.optionals (s == "workmanager") (check {
            what = "virtufin-workmanager.service VIRTUFIN_WM_PYTHON";
            expected = "/nix/store/…/bin/python3";
            found = env.VIRTUFIN_WM_PYTHON or null;
            ok = lib.hasSuffix "/bin/python3" (env.VIRTUFIN_WM_PYTHON or "");
          })
      );

  # Valkey: NixOS's own unit from the redis module (no packaged unit).
  valkeyChecks = let
    u = unit "redis-virtufin.service";
    d = parse u.text;
    prep = lib.removePrefix "+" (value d "Service" "ExecStartPre");
    prepText = storeFile prep;
    confPath = let
      m = builtins.match ".*include \"(${builtins.storeDir}/[^\"]*-redis.conf)\".*" (toString prepText);
    in
      if m == null
      then null
      else builtins.head m;
    conf = parse (toString (storeFile confPath));
    confValue = key: let
      v = lib.filter (l: lib.hasPrefix "${key} " l) (lib.splitString "\n" (toString (storeFile confPath)));
    in
      if v == []
      then null
      else lib.removePrefix "${key} " (builtins.head v);
  in
    # An external Valkey: none runs here.
    lib.optionals (runs "api" && external != null) (
      same "a local Valkey (redis-virtufin.service) with valkey.external" false (u != null)
      ++ same "the redis module's servers with valkey.external (none of the module's)" (case.redisServers or []) r.redisServers
    )
    ++ lib.optionals (runs "api" && u != null) (
      same "redis-virtufin.service is a unit of its own (no package ships it)" false u.dropin
      ++ check {
        what = "redis-virtufin.service ExecStart= runs valkey-server";
        expected = "…-valkey/bin/valkey-server …";
        found = value d "Service" "ExecStart";
        ok = lib.hasInfix "-valkey/bin/valkey-server " (toString (value d "Service" "ExecStart"));
      }
      ++ same "redis-virtufin.service Type=" "notify" (value d "Service" "Type")
      ++ check {
        what = "redis-virtufin.service's ExecStartPre= script and its redis.conf are readable store files";
        expected = true;
        found = {inherit prep confPath;};
        ok = prepText != null && confPath != null && storeFile confPath != null;
      }
      ++ lib.optionals (confPath != null) (
        same "redis.conf port" (toString valkeyPort) (confValue "port")
        ++ same "redis.conf bind" "127.0.0.1" (confValue "bind")
        ++ same "redis.conf appendonly" "yes" (confValue "appendOnly")
      )
      ++ same "redis-virtufin.service's prep script reads the password file (requirePassFile)"
      (password != null) (password != null && lib.hasInfix "cat ${lib.escapeShellArg password}" (toString prepText))
      ++ same "virtufin-api.service is handed the password as the credential valkey-password"
      (password != null && backend == "valkey")
      (lib.any (c: lib.hasPrefix "valkey-password:" c) (values (parse (unit "virtufin-api.service").text) "Service" "LoadCredential"))
    );

  daprChecks = let
    u = unit "virtufin-daprd.service";
    d = parse u.text;
    dd = r.daprd;
    c = dd.components;
    meta = comp: lib.listToAttrs (map (x: lib.nameValuePair x.name (x.value or x.secretKeyRef or null)) (comp.spec.metadata or []));
    ref = credential: {
      name = credential;
      key = credential;
    };
    redisMeta =
      {
        redisHost =
          if external != null
          then external.redisHost
          else "127.0.0.1:${toString valkeyPort}";
      }
      // (
        if external != null
        then external.meta or {}
        else {}
      )
      // lib.optionalAttrs (password != null) {redisPassword = ref "valkey-password";}
      // lib.optionalAttrs (sentinelPassword != null) {sentinelPassword = ref "valkey-sentinel-password";};
    secrets = valkeySecrets != {};
    pre = value d "Service" "ExecStartPre";
    readable = c != null && lib.all (v: v != null) (builtins.attrValues c);
    # name, type, metadata (name -> value or secretKeyRef) and auth of one.
    summary = file: let
      comp = c.${file} or {};
    in {
      name = comp.metadata.name or null;
      type = comp.spec.type or null;
      meta = meta comp;
      auth = comp.auth or {};
    };
  in
    lib.optionals (runs "api" && backend == "dapr" && u != null) (
      same "virtufin-daprd.service is a unit of its own" false u.dropin
      ++ same "virtufin-daprd.service Requires=" [] (words d "Unit" "Requires")
      ++ same "virtufin-daprd.service Wants=" [
        (
          if external != null
          then online
          else "redis-virtufin.service"
        )
      ] (words d "Unit" "Wants")
      ++ sameSet "virtufin-daprd.service After=" [
        "network.target"
        (
          if external != null
          then online
          else "redis-virtufin.service"
        )
      ] (words d "Unit" "After")
      ++ same "virtufin-daprd.service Before=" ["virtufin-api.service"] (words d "Unit" "Before")
      ++ same "virtufin-daprd.service WantedBy=" ["multi-user.target"] (words d "Install" "WantedBy")
      ++ lib.concatLists (lib.mapAttrsToList (k: v: same "virtufin-daprd.service ${k}=" v (value d "Service" k)) {
        DynamicUser = "true";
        NoNewPrivileges = "true";
        ProtectSystem = "strict";
        PrivateUsers = "true";
        CapabilityBoundingSet = "";
        RuntimeDirectory = "virtufin-daprd";
        UMask = "0077";
        # A crash of daprd must not stop and restart the api (Requires=).
        RestartMode = "direct";
      })
      # Without it, daprd exits in the sandbox on a host without a default
      # route (its host address lookup needs netlink).
      ++ same "virtufin-daprd.service Environment DAPR_HOST_IP" "127.0.0.1" ((environment d).DAPR_HOST_IP or null)
      ++ check {
        what = "daprd's binary";
        expected = "/nix/store/…/bin/daprd";
        found = builtins.head dd.argv;
        ok = lib.hasSuffix "/bin/daprd" (builtins.head dd.argv);
      }
      ++ lib.concatLists (lib.mapAttrsToList (flag: v: same "daprd ${flag}" v (dd.after flag)) {
        "--mode" = "standalone";
        "--app-id" = "virtufin-api";
        "--app-protocol" = "grpc";
        "--dapr-listen-addresses" = "127.0.0.1";
        "--dapr-internal-grpc-listen-address" = "127.0.0.1";
        "--dapr-http-port" = toString dapr.http;
        "--dapr-grpc-port" = toString dapr.grpc;
      })
      ++ same "daprd's last arguments (dapr.extraArgs)" dapr.extraArgs (lib.drop (builtins.length dd.argv - builtins.length dapr.extraArgs) dd.argv)
      ++ check {
        what = "daprd's --resources-path: a linkFarm of formats.yaml files, readable here";
        expected = "components";
        found = dd.resources;
        ok = readable;
      }
      ++ lib.optionals readable (
        same "daprd's components (files in --resources-path)"
        (["pubsub.yaml" "resiliency.yaml" "secretstore.yaml" "statestore.yaml"] ++ lib.optional secrets "valkey-secretstore.yaml")
        (builtins.attrNames c)
        ++ same "component statestore" {
          name = "statestore";
          type = "state.redis";
          meta = redisMeta;
          auth = lib.optionalAttrs secrets {secretStore = "virtufin-valkey";};
        } (summary "statestore.yaml")
        ++ same "component pubsub" {
          name = "pubsub";
          type = "pubsub.redis";
          # packaging/dapr/resources/pubsub.json with the deployment's timeouts.
          meta =
            redisMeta
            // {
              concurrency = "1024";
              queueDepth = "1024";
              processingTimeout = "60s";
              redeliverInterval = "15s";
              maxLenApprox = "100000";
            };
          auth = lib.optionalAttrs secrets {secretStore = "virtufin-valkey";};
        } (summary "pubsub.yaml")
        ++ same "component virtufin-secrets (dapr.secretsFile, as a credential)" {
          name = "virtufin-secrets";
          type = "secretstores.local.file";
          meta.secretsFile = "/run/credentials/virtufin-daprd.service/secrets.json";
          auth = {};
        } (summary "secretstore.yaml")
        ++ same "resiliency virtufin-delivery (pubsub inbound deliveries retried, see packaging/dapr/resources)" {
          kind = "Resiliency";
          targets.components.pubsub.inbound.retry = "until-unsubscribed";
        } {
          kind = c."resiliency.yaml".kind or null;
          targets = c."resiliency.yaml".spec.targets or null;
        }
        ++ lib.optionals secrets (same "component virtufin-valkey (the passwords, written at start)" {
          name = "virtufin-valkey";
          type = "secretstores.local.file";
          meta.secretsFile = "/run/virtufin-daprd/valkey-secrets.json";
          auth = {};
        } (summary "valkey-secretstore.yaml"))
      )
      ++ lib.optionals secrets (check {
        what = "daprd's ExecStartPre= writes each password from its credential, as the key of that name, into the runtime directory";
        expected = map (n: "jq … \"$CREDENTIALS_DIRECTORY/${n}\" … \"${n}\": … > /run/virtufin-daprd/valkey-secrets.json") (builtins.attrNames valkeySecrets);
        found = storeFile pre;
        ok =
          pre
          != null
          && lib.all (n: lib.hasInfix "\"$CREDENTIALS_DIRECTORY/${n}\"" (toString (storeFile pre)) && lib.hasInfix "\"${n}\": (" (toString (storeFile pre))) (builtins.attrNames valkeySecrets)
          && lib.hasInfix "> /run/virtufin-daprd/valkey-secrets.json" (toString (storeFile pre));
      })
      ++ same "virtufin-daprd.service ExecStartPre=" secrets (pre != null)
      ++ sameSet "virtufin-daprd.service LoadCredential= (store: the empty secrets file)"
      ([
          (
            if dapr.secretsFile != null
            then "secrets.json:${dapr.secretsFile}"
            else "secrets.json:store"
          )
        ]
        ++ lib.mapAttrsToList (n: p: "${n}:${p}") valkeySecrets)
      (map (l:
        if lib.hasPrefix "secrets.json:${builtins.storeDir}/" l && lib.hasSuffix "-virtufin-dapr-secrets.json" l
        then "secrets.json:store"
        else l) (values d "Service" "LoadCredential"))
      ++ check {
        what = "daprd's health wait polls its HTTP port";
        expected = "http://127.0.0.1:${toString dapr.http}/v1.0/healthz";
        found = storeFile (value d "Service" "ExecStartPost");
        ok = lib.hasInfix "http://127.0.0.1:${toString dapr.http}/v1.0/healthz" (toString (storeFile (value d "Service" "ExecStartPost")));
      }
    );

  # No secret's content anywhere a reader of the store could see it.
  secretChecks = lib.optionals (canary != null) (check {
    what = "no secret in any rendered unit or store file";
    expected = [];
    found =
      map (n: "unit ${n}") (builtins.attrNames (lib.filterAttrs (_: u: lib.hasInfix canary u.text) r.units))
      ++ map (p: "store file ${p}") (builtins.attrNames (lib.filterAttrs (_: t: lib.hasInfix canary t) r.storeFiles));
  });
in
  messagesChecks
  ++ lib.optionals (expectedAssertions == []) (
    sameSet "the host's units" ourUnits (builtins.attrNames r.units)
    ++ sameSet "open TCP ports (networking.firewall.allowedTCPPorts)" (case.firewall or []) r.firewall.tcp
    ++ lib.concatMap serviceChecks services
    ++ lib.concatMap socketChecks services
    ++ valkeyChecks
    ++ daprChecks
    ++ secretChecks
    ++ lib.concatMap (x: same x.what x.expected x.found) ((case.extra or (_: [])) r)
  )
