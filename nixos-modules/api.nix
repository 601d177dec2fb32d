# virtufin-api, its Valkey and (backend = "dapr") its Dapr sidecar.
#
# The unit itself is the one in systemd/virtufin-api.service, installed by
# the package into lib/systemd/system and picked up through
# `systemd.packages`: ordering, Type=notify, WatchdogSec=, restart policy
# and hardening are defined there only. What this module sets under
# `systemd.services.virtufin-api` becomes the drop-in
# `virtufin-api.service.d/overrides.conf` (NixOS does that when a package
# already provides the unit): the environment, EnvironmentFile=, the
# credentials (Valkey's passwords among them), the store it requires (or,
# with an external Valkey, the network it waits for), and wantedBy (NixOS
# ignores [Install] sections).
{
  config,
  lib,
  pkgs,
  ...
}: let
  inherit (lib) mkDefault mkIf mkMerge optional optionals optionalAttrs;
  vlib = import ./lib.nix {inherit lib;};
  cfg = config.services.virtufin;
  svc = cfg.api;
  dapr = cfg.dapr;

  valkeyUnit = "redis-virtufin.service";
  daprUnit = "virtufin-daprd.service";
  online = "network-online.target";
  password = cfg.valkey.passwordFile != null;

  # --- which Valkey: the local one, or valkey.external ---------------------
  ext = cfg.valkey.external;
  sentinel = ext.sentinels != [];
  # No local Valkey then: the api and daprd reach it over the network.
  external = ext.address != null || sentinel;
  sentinelPassword = sentinel && ext.sentinelPasswordFile != null;
  user = lib.optionalString (external && ext.username != null) "${ext.username}@";
  # daprd's redisHost: host:port, or with Sentinel all of them,
  # comma-separated (components-contrib 1.17 splits the list for go-redis).
  valkeyAddress =
    if ext.address != null
    then ext.address
    else if sentinel
    then lib.concatStringsSep "," ext.sentinels
    else "127.0.0.1:${toString cfg.valkey.port}";
  valkeyUrl =
    if sentinel
    then "redis+sentinel://${user}${valkeyAddress}/${ext.primaryName}"
    else "redis://${user}${valkeyAddress}";
  # HOST:PORT, IPv6 in brackets, as both the api and go-redis split it.
  isHostPort = a: let
    m = builtins.match "([[][0-9A-Fa-f:.]+[]]|[A-Za-z0-9._-]+):([0-9]{1,5})" a;
  in
    m != null && lib.toInt (builtins.elemAt m 1) > 0 && lib.toInt (builtins.elemAt m 1) < 65536;
  # The credentials that carry Valkey's passwords (name -> file).
  valkeyCredentials =
    optionalAttrs password {valkey-password = toString cfg.valkey.passwordFile;}
    // optionalAttrs sentinelPassword {valkey-sentinel-password = toString ext.sentinelPasswordFile;};
  runs = name: cfg.enable && cfg.${name}.enable && cfg.${name}.imported;

  # --- daprd's components (the seed's layout, on the local Valkey) ---------
  yaml = pkgs.formats.yaml {};
  # The user's secret store (dapr.secretsFile), and the one holding only
  # Valkey's password: a JSON file daprd's ExecStartPre writes from the
  # credential into the unit's runtime directory (never in the store).
  valkeyStoreName = "virtufin-valkey";
  # systemd puts LoadCredential= files here ($CREDENTIALS_DIRECTORY).
  secretsPath = "/run/credentials/${daprUnit}/secrets.json";
  valkeySecretsPath = "/run/virtufin-daprd/valkey-secrets.json";
  secretRef = name: credential: {
    inherit name;
    secretKeyRef = {
      name = credential;
      key = credential;
    };
  };
  # What the two Valkey components take beyond the resource files: the
  # Sentinel settings and ACL user of an external Valkey (plain values),
  # and the passwords (from the secret store virtufin-valkey).
  connectionMetadata =
    optionals sentinel [
      {
        name = "failover";
        value = "true";
      }
      {
        name = "sentinelMasterName";
        value = ext.primaryName;
      }
    ]
    ++ optional (user != "") {
      name = "redisUsername";
      value = ext.username;
    };
  passwordMetadata =
    optional password (secretRef "redisPassword" "valkey-password")
    ++ optional sentinelPassword (secretRef "sentinelPassword" "valkey-sentinel-password");
  secretStore = name: path: {
    apiVersion = "dapr.io/v1alpha1";
    kind = "Component";
    metadata = {inherit name;};
    spec = {
      type = "secretstores.local.file";
      version = "v1";
      metadata = [
        {
          name = "secretsFile";
          value = path;
        }
      ];
    };
  };
  # The resource files are the repository's packaging/dapr/resources (the
  # tests run daprd with the same ones), placeholders filled in here; the
  # two Valkey components also get connectionMetadata, and with a password
  # they take it from virtufin-valkey.
  resourceFile = name:
    builtins.fromJSON (builtins.replaceStrings
      ["@VALKEY_HOST@" "@SECRETS_FILE@" "@PROCESSING_TIMEOUT@" "@REDELIVER_INTERVAL@"]
      [valkeyAddress secretsPath "60s" "15s"]
      (builtins.readFile (../packaging/dapr/resources + "/${name}.json")));
  valkeyComponent = resource:
    resource
    // {spec = resource.spec // {metadata = resource.spec.metadata ++ connectionMetadata ++ passwordMetadata;};}
    // optionalAttrs (passwordMetadata != []) {auth.secretStore = valkeyStoreName;};
  components =
    {
      "statestore.yaml" = valkeyComponent (resourceFile "statestore");
      "pubsub.yaml" = valkeyComponent (resourceFile "pubsub");
      "secretstore.yaml" = resourceFile "secretstore";
      "resiliency.yaml" = resourceFile "resiliency";
    }
    // optionalAttrs (valkeyCredentials != {}) {
      "valkey-secretstore.yaml" = secretStore valkeyStoreName valkeySecretsPath;
    };
  resourcesDir = pkgs.linkFarm "virtufin-dapr-resources" (lib.mapAttrs yaml.generate components);

  # The Gateway's backends: the downstream services this host runs, as
  # the Debian package's /etc/virtufin/services.json lists them.
  servicesFile = pkgs.writeText "virtufin-services.json" (builtins.toJSON {
    services =
      map (name: {
        inherit name;
        grpc = {
          host = vlib.localAddress cfg.${name}.listenAddress;
          port = cfg.${name}.grpcPort;
          reflectionEnabled = true;
        };
      })
      (lib.filter runs ["websocketmanager" "workmanager"]);
  });

  # No secrets configured: an empty store, so the component still loads.
  emptySecrets = pkgs.writeText "virtufin-dapr-secrets.json" "{}";

  # Valkey's passwords, from the credentials, as the JSON file of the
  # secret store virtufin-valkey (one key per credential); trimmed as
  # Valkey reads them (requirePassFile is spliced into a config line).
  secretNames = builtins.attrNames valkeyCredentials;
  daprdValkeySecrets = pkgs.writeShellScript "virtufin-daprd-valkey-secrets" ''
    ${pkgs.jq}/bin/jq -n ${lib.concatImapStringsSep " " (i: n: ''--rawfile s${toString i} "$CREDENTIALS_DIRECTORY/${n}"'') secretNames} \
      '{${lib.concatImapStringsSep ", " (i: n: ''"${n}": ($s${toString i} | sub("^\\s+"; "") | sub("\\s+$"; ""))'') secretNames}}' \
      > ${valkeySecretsPath}
  '';

  # daprd has no sd_notify: its start job ends only once /v1.0/healthz
  # answers (204), so units ordered After= it start after that.
  daprdHealthy = pkgs.writeShellScript "virtufin-daprd-healthy" ''
    for _ in $(seq 900); do
      if ${pkgs.curl}/bin/curl -fsS -o /dev/null http://127.0.0.1:${toString dapr.httpPort}/v1.0/healthz; then
        exit 0
      fi
      sleep 0.1
    done
    echo "daprd: /v1.0/healthz did not answer" >&2
    exit 1
  '';

  daprdArgs =
    [
      "${dapr.package}/bin/daprd"
      "--mode"
      "standalone"
      "--app-id"
      "virtufin-api"
      "--app-protocol"
      "grpc"
      "--dapr-listen-addresses"
      "127.0.0.1"
      "--dapr-internal-grpc-listen-address"
      "127.0.0.1"
      "--dapr-http-port"
      (toString dapr.httpPort)
      "--dapr-grpc-port"
      (toString dapr.grpcPort)
      "--resources-path"
      "${resourcesDir}"
      "--enable-metrics=false"
    ]
    ++ dapr.extraArgs;

  # (The credentials set from valkey.passwordFile and
  # valkey.external.sentinelPasswordFile are checked as those options.)
  checks = vlib.serviceChecks "services.virtufin.api" "virtufin-api" (svc
    // {
      credentials = removeAttrs svc.credentials (optionals (cfg.backend == "valkey") secretNames);
    });
in {
  imports = [./common.nix];

  config = mkMerge [
    {services.virtufin.api.imported = true;}

    (mkIf (cfg.enable && svc.enable) {
      assertions =
        checks.assertions
        ++ [
          (vlib.notInStore "services.virtufin.valkey.passwordFile" cfg.valkey.passwordFile)
          (vlib.notInStore "services.virtufin.valkey.external.sentinelPasswordFile" ext.sentinelPasswordFile)
          {
            assertion = !(ext.address != null && sentinel);
            message = ''
              services.virtufin.valkey.external.address and
              services.virtufin.valkey.external.sentinels are both set: the api
              reaches one Valkey either directly or through Sentinels. Keep one
              (with Sentinel, the address of the primary is what they answer).
            '';
          }
          {
            assertion = lib.all isHostPort (optional (ext.address != null) ext.address ++ ext.sentinels);
            message = ''
              services.virtufin.valkey.external: ${builtins.toJSON (lib.filter (a: !isHostPort a) (optional (ext.address != null) ext.address ++ ext.sentinels))}
              is not HOST:PORT. Give each as "valkey.example:6379", "10.0.0.1:26379"
              or "[2001:db8::1]:26379" (a port is required: 6379 for Valkey,
              26379 for a Sentinel by convention).
            '';
          }
          {
            assertion = builtins.match "[^/,@[:space:]]+" ext.primaryName != null;
            message = ''
              services.virtufin.valkey.external.primaryName = "${ext.primaryName}" is not
              a Sentinel primary name (non-empty; no "/", ",", "@" or spaces).
            '';
          }
          {
            assertion = ext.username == null || (external && builtins.match "[^:/@,[:space:]]+" ext.username != null);
            message = ''
              services.virtufin.valkey.external.username = "${toString ext.username}" needs
              services.virtufin.valkey.external.address or .sentinels (the local Valkey
              has no ACL users), and may not contain ":", "/", "@", "," or spaces.
            '';
          }
          {
            assertion = ext.sentinelPasswordFile == null || sentinel;
            message = ''
              services.virtufin.valkey.external.sentinelPasswordFile is set but
              services.virtufin.valkey.external.sentinels is empty: nothing would read it.
            '';
          }
          {
            assertion = cfg.valkey.minReplicas == 0 || cfg.backend == "valkey";
            message = ''
              services.virtufin.valkey.minReplicas = ${toString cfg.valkey.minReplicas} needs backend = "valkey":
              with backend = "dapr" daprd's components write, and they never WAIT
              for replicas, so nothing could confirm it.
            '';
          }
          (vlib.notInStore "services.virtufin.dapr.secretsFile" dapr.secretsFile)
          {
            # A password in the URL would be in the world-readable store.
            assertion = builtins.match "[a-z+]+://[^/@]*:[^/@]*@.*" (toString (svc.settings.VIRTUFIN_VALKEY_URL or "")) == null;
            message = ''
              services.virtufin.api.settings.VIRTUFIN_VALKEY_URL carries a password,
              and settings are written to the Nix store, which every user can read.
              Use services.virtufin.valkey.passwordFile (or a URL in
              services.virtufin.api.environmentFile).
            '';
          }
        ]
        ++ vlib.settingsAssertions "services.virtufin.api" svc.settings ([
            {
              name = "VIRTUFIN_BACKEND";
              option = "services.virtufin.backend";
              value = cfg.backend;
            }
          ]
          # With an external Valkey daprd's components follow the options
          # too: the api may not be pointed elsewhere.
          ++ optional (external && cfg.backend == "valkey") {
            name = "VIRTUFIN_VALKEY_URL";
            option = "services.virtufin.valkey.external";
            value = valkeyUrl;
          }
          ++ optionals (cfg.backend == "dapr") [
            {
              name = "DAPR_HOST";
              option = "daprd's listen address";
              value = "127.0.0.1";
            }
            {
              name = "DAPR_GRPC_PORT";
              option = "services.virtufin.dapr.grpcPort";
              value = dapr.grpcPort;
            }
            {
              name = "DAPR_HTTP_PORT";
              option = "services.virtufin.dapr.httpPort";
              value = dapr.httpPort;
            }
          ]);
      inherit (checks) warnings;

      systemd.packages = [cfg.package];
      # Socket activation: the listeners, at the module's address and ports.
      systemd.sockets = vlib.socketUnits "virtufin-api" svc;

      services.virtufin.api.settings = lib.mapAttrs (_: mkDefault) ({
          ASPNETCORE_URLS = "http://${vlib.urlHost svc.listenAddress}:${toString svc.httpPort}";
          VIRTUFIN_GRPC_HOST = svc.listenAddress;
          VIRTUFIN_GRPC_PORT = svc.grpcPort;
          VIRTUFIN_BACKEND = cfg.backend;
          SERVICES_CONFIG_PATH = "${servicesFile}";
          RUST_LOG = "info";
        }
        // optionalAttrs (cfg.backend == "valkey") {
          VIRTUFIN_VALKEY_URL = valkeyUrl;
        }
        // optionalAttrs (cfg.backend == "valkey" && cfg.valkey.minReplicas > 0) {
          VIRTUFIN_VALKEY_MIN_REPLICAS = cfg.valkey.minReplicas;
          VIRTUFIN_VALKEY_WAIT_TIMEOUT = cfg.valkey.waitTimeout;
        }
        // optionalAttrs (cfg.backend == "dapr") {
          DAPR_HOST = "127.0.0.1";
          DAPR_GRPC_PORT = dapr.grpcPort;
          DAPR_HTTP_PORT = dapr.httpPort;
        });

      # With the valkey backend the api reads Valkey's passwords from these
      # credentials (valkey-password, valkey-sentinel-password) when it
      # finds no VIRTUFIN_VALKEY_PASSWORD_FILE / _SENTINEL_PASSWORD_FILE.
      services.virtufin.api.credentials = mkIf (cfg.backend == "valkey") valkeyCredentials;

      # The same binding as the Debian package's postinst drop-in
      # (Wants=/After= the store), plus Requires= daprd with the dapr
      # backend. Wants=, not Requires=, on Valkey: the api waits for it by
      # itself (not ready, STATUS= says why), and with Requires= systemd
      # stops and restarts the api whenever Valkey restarts — by its own
      # Restart= after a crash too — which cuts every open call and stream
      # for nothing (the chaos pass saw 8 s instead of under 1).
      # daprd's RestartMode=direct keeps its crash from restarting the api.
      # The api also gates its own READY=1 on daprd's /v1.0/healthz and a
      # state and pub/sub round trip, so After= is ordering, not readiness.
      # An external Valkey is no unit here: the api waits for the network
      # (Wants=, not Requires=: it retries, and says so in STATUS=).
      systemd.services.virtufin-api = {
        wantedBy = ["multi-user.target"];
        requires = optional (cfg.backend == "dapr") daprUnit;
        wants = optional (cfg.backend == "valkey") (
          if external
          then online
          else valkeyUnit
        );
        after =
          if cfg.backend == "dapr"
          then optional (!external) valkeyUnit ++ [daprUnit]
          else [
            (
              if external
              then online
              else valkeyUnit
            )
          ];
        environment = vlib.toEnvironment svc.settings;
        serviceConfig = {
          EnvironmentFile = optional (svc.environmentFile != null) (toString svc.environmentFile);
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${toString path}") svc.credentials;
        };
      };

      networking.firewall.allowedTCPPorts = optionals svc.openFirewall [svc.httpPort svc.grpcPort];
    })

    (mkIf (cfg.enable && svc.enable && !external) {
      # Valkey with the append-only file: an acknowledged write survives a
      # restart of Valkey and a reboot.
      services.redis.package = mkDefault pkgs.valkey;
      services.redis.servers.virtufin = {
        enable = true;
        bind = "127.0.0.1";
        port = cfg.valkey.port;
        appendOnly = true;
        requirePassFile =
          if password
          then toString cfg.valkey.passwordFile
          else null;
      };
    })

    (mkIf (cfg.enable && svc.enable && cfg.backend == "dapr") {
      systemd.services.virtufin-daprd = {
        description = "Dapr sidecar of virtufin-api (app-id virtufin-api)";
        documentation = ["https://docs.dapr.io/reference/arguments-annotations-overview/"];
        wantedBy = ["multi-user.target"];
        # Like the api: Wants= Valkey (it reconnects by itself).
        wants = [
          (
            if external
            then online
            else valkeyUnit
          )
        ];
        after = [
          "network.target"
          (
            if external
            then online
            else valkeyUnit
          )
        ];
        before = ["virtufin-api.service"];
        environment = {
          HOME = "/run/virtufin-daprd";
          # The address daprd would otherwise look up with a UDP "connection"
          # to 8.8.8.8 and then netlink, which the sandbox forbids: on a host
          # without a default route daprd exits ("failed to determine host
          # address"). It only listens on 127.0.0.1 anyway.
          DAPR_HOST_IP = "127.0.0.1";
        };
        serviceConfig = {
          Type = "exec";
          ExecStart = lib.concatStringsSep " " daprdArgs;
          ExecStartPre = optional (secretNames != []) daprdValkeySecrets;
          ExecStartPost = daprdHealthy;
          Restart = "on-failure";
          # Straight back to activating (systemd >= 254): a crash of daprd
          # does not stop and restart the api, which Requires= it; the api
          # reports not ready until daprd answers again.
          RestartMode = "direct";
          RestartSec = "1s";
          TimeoutStartSec = "90s";
          TimeoutStopSec = "20s";
          LoadCredential =
            [
              "secrets.json:${
                if dapr.secretsFile != null
                then toString dapr.secretsFile
                else emptySecrets
              }"
            ]
            ++ lib.mapAttrsToList (name: path: "${name}:${path}") valkeyCredentials;
          DynamicUser = true;
          RuntimeDirectory = "virtufin-daprd";
          UMask = "0077";

          # The same hardening as the virtufin units.
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          NoNewPrivileges = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RemoveIPC = true;
          KeyringMode = "private";
          DevicePolicy = "closed";
          SystemCallArchitectures = "native";
          # As the units, but @resources stays allowed: the Go runtime
          # raises its RLIMIT_NOFILE with setrlimit at start.
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
        };
      };
    })
  ];
}
