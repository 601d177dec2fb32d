# virtufin-api, its Valkey and (backend = "dapr") its Dapr sidecar.
#
# The unit itself is the one in systemd/virtufin-api.service, installed by
# the package into lib/systemd/system and picked up through
# `systemd.packages`: ordering, Type=notify, WatchdogSec=, restart policy
# and hardening are defined there only. What this module sets under
# `systemd.services.virtufin-api` becomes the drop-in
# `virtufin-api.service.d/overrides.conf` (NixOS does that when a package
# already provides the unit): the environment, the store it requires, and
# wantedBy (NixOS ignores [Install] sections).
{
  config,
  lib,
  pkgs,
  ...
}: let
  inherit (lib) mkDefault mkIf mkMerge optional optionalAttrs;
  vlib = import ./lib.nix {inherit lib;};
  cfg = config.services.virtufin;
  svc = cfg.api;
  dapr = cfg.dapr;

  valkeyUnit = "redis-virtufin.service";
  daprUnit = "virtufin-daprd.service";
  valkeyAddress = "127.0.0.1:${toString cfg.valkey.port}";

  # --- daprd's components (the seed's layout, on the local Valkey) ---------
  yaml = pkgs.formats.yaml {};
  secretStoreName = "virtufin-secrets";
  # systemd puts LoadCredential= files here ($CREDENTIALS_DIRECTORY).
  secretsPath = "/run/credentials/${daprUnit}/secrets.json";
  redisMetadata =
    [
      {
        name = "redisHost";
        value = valkeyAddress;
      }
    ]
    ++ optional (cfg.valkey.passwordFile != null) {
      name = "redisPassword";
      secretKeyRef = {
        name = "valkey-password";
        key = "valkey-password";
      };
    };
  component = name: type: metadata: {
    apiVersion = "dapr.io/v1alpha1";
    kind = "Component";
    metadata = {inherit name;};
    spec = {
      inherit type metadata;
      version = "v1";
    };
    auth.secretStore = secretStoreName;
  };
  components = {
    "statestore.yaml" = component "statestore" "state.redis" redisMetadata;
    "pubsub.yaml" = component "pubsub" "pubsub.redis" redisMetadata;
    "secretstore.yaml" = {
      apiVersion = "dapr.io/v1alpha1";
      kind = "Component";
      metadata.name = secretStoreName;
      spec = {
        type = "secretstores.local.file";
        version = "v1";
        metadata = [
          {
            name = "secretsFile";
            value = secretsPath;
          }
        ];
      };
    };
  };
  resourcesDir = pkgs.runCommand "virtufin-dapr-resources" {} ''
    mkdir -p $out
    ${lib.concatStringsSep "\n" (lib.mapAttrsToList
      (file: value: "cp ${yaml.generate file value} $out/${file}")
      components)}
  '';
  # The Gateway's backends: the downstream services this host runs, as
  # the Debian package's /etc/virtufin/services.json lists them.
  localHost = address:
    if address == "0.0.0.0" || address == "::"
    then "127.0.0.1"
    else address;
  servicesFile = pkgs.writeText "virtufin-services.json" (builtins.toJSON {
    services =
      map (name: {
        inherit name;
        grpc = {
          host = localHost cfg.${name}.listenAddress;
          port = cfg.${name}.grpcPort;
          reflectionEnabled = true;
        };
      })
      (lib.filter (name: cfg.${name}.enable) ["websocketmanager" "workmanager"]);
  });

  # No secrets configured: an empty store, so the component still loads.
  emptySecrets = pkgs.writeText "virtufin-dapr-secrets.json" "{}";

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
in {
  imports = [./common.nix];

  config = mkIf (cfg.enable && svc.enable) (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.backend == "dapr" && cfg.valkey.passwordFile != null -> dapr.secretsFile != null;
          message = ''
            services.virtufin.valkey.passwordFile is set with backend = "dapr":
            daprd reads the password from services.virtufin.dapr.secretsFile
            (key "valkey-password"), which is not set.
          '';
        }
      ];

      systemd.packages = [cfg.package];

      services.virtufin.api.settings = lib.mapAttrs (_: mkDefault) ({
          ASPNETCORE_URLS = "http://${vlib.urlHost svc.listenAddress}:${toString svc.httpPort}";
          VIRTUFIN_GRPC_HOST = svc.listenAddress;
          VIRTUFIN_GRPC_PORT = svc.grpcPort;
          VIRTUFIN_BACKEND = cfg.backend;
          SERVICES_CONFIG_PATH = "${servicesFile}";
          RUST_LOG = "info";
        }
        // optionalAttrs (cfg.backend == "valkey") {
          VIRTUFIN_VALKEY_URL = "redis://${valkeyAddress}";
        }
        // optionalAttrs (cfg.backend == "dapr") {
          DAPR_HOST = "127.0.0.1";
          DAPR_GRPC_PORT = dapr.grpcPort;
          DAPR_HTTP_PORT = dapr.httpPort;
        });

      # The same binding as the Debian package's postinst drop-in
      # (Requires=/After= the store), plus daprd with the dapr backend.
      # The api also gates its own READY=1 on daprd's /v1.0/healthz and a
      # state and pub/sub round trip, so After= is ordering, not readiness.
      systemd.services.virtufin-api = {
        wantedBy = ["multi-user.target"];
        requires = [
          (
            if cfg.backend == "dapr"
            then daprUnit
            else valkeyUnit
          )
        ];
        after = [valkeyUnit] ++ optional (cfg.backend == "dapr") daprUnit;
        environment = vlib.toEnvironment svc.settings;
        serviceConfig = {
          EnvironmentFile = optional (svc.environmentFile != null) svc.environmentFile;
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") svc.credentials;
        };
      };

      # Valkey with the append-only file: an acknowledged write survives a
      # restart of Valkey and a reboot.
      services.redis.package = mkDefault pkgs.valkey;
      services.redis.servers.virtufin = {
        enable = true;
        bind = "127.0.0.1";
        port = cfg.valkey.port;
        appendOnly = true;
        requirePassFile = cfg.valkey.passwordFile;
      };

      networking.firewall.allowedTCPPorts = optional svc.openFirewall svc.httpPort ++ optional svc.openFirewall svc.grpcPort;
    }

    (mkIf (cfg.backend == "dapr") {
      systemd.services.virtufin-daprd = {
        description = "Dapr sidecar of virtufin-api (app-id virtufin-api)";
        documentation = ["https://docs.dapr.io/reference/arguments-annotations-overview/"];
        wantedBy = ["multi-user.target"];
        requires = [valkeyUnit];
        after = ["network.target" valkeyUnit];
        before = ["virtufin-api.service"];
        environment.HOME = "/run/virtufin-daprd";
        serviceConfig = {
          Type = "exec";
          ExecStart = lib.concatStringsSep " " daprdArgs;
          ExecStartPost = daprdHealthy;
          Restart = "on-failure";
          RestartSec = "1s";
          TimeoutStartSec = "90s";
          TimeoutStopSec = "20s";
          LoadCredential = [
            "secrets.json:${
              if dapr.secretsFile != null
              then toString dapr.secretsFile
              else emptySecrets
            }"
          ];
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
  ]);
}
