# Options of services.virtufin (all three services, the backend, Valkey and
# the Dapr sidecar). The service modules (api.nix, websocketmanager.nix,
# workmanager.nix) import this file and implement their part.
{
  config,
  lib,
  pkgs,
  ...
}: let
  inherit (lib) mkOption types literalExpression;
  cfg = config.services.virtufin;
  settingsFormat = pkgs.formats.keyValue {};

  serviceOptions = {
    name,
    description,
    httpPort,
    grpcPort,
    settingsExample,
  }: {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether to run ${description} when
        {option}`services.virtufin.enable` is set (and its module is
        imported: all of them with the flake's `nixosModules.default`).
      '';
    };

    imported = mkOption {
      type = types.bool;
      default = false;
      internal = true;
      description = ''
        Set by the module of ${name}: whether it is part of this
        configuration (the flake's modules can be imported one by one).
      '';
    };

    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address of the HTTP (health, REST) and gRPC listeners
        (`ASPNETCORE_URLS`, `VIRTUFIN_GRPC_HOST`): an IPv4 or IPv6 literal
        without brackets (the service resolves no host names). The other
        services on this host connect to it there (`0.0.0.0` and `::`
        through the loopback of their family).
      '';
    };

    httpPort = mkOption {
      type = types.port;
      default = httpPort;
      description = "HTTP port of ${name} (health and REST); the one place to change it (`settings` may not contradict it).";
    };

    grpcPort = mkOption {
      type = types.port;
      default = grpcPort;
      description = ''
        gRPC (h2c) port of ${name} (`VIRTUFIN_GRPC_PORT`): the firewall and
        the services that connect to it follow this option, so it is the one
        place to change it (`settings` may not contradict it).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open the HTTP and gRPC ports of ${name} in the firewall.";
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = {};
      example = settingsExample;
      description = ''
        Environment of ${name} (RFC 42 freeform settings): each attribute is
        one variable that `${name} --help` lists (flags win over them).
        The module sets the listen address, ports and backend from the
        other options with `mkDefault`; anything else set here wins, and
        `null` unsets a variable. A value contradicting one of those options
        (`VIRTUFIN_GRPC_HOST`, `VIRTUFIN_GRPC_PORT`, the port of
        `ASPNETCORE_URLS` or `VIRTUFIN_HTTP_PORT`; the api's
        `VIRTUFIN_BACKEND` and `DAPR_*`) fails an assertion naming the
        option to set instead. Secrets do not belong here (this ends up in
        the Nix store): use {option}`environmentFile` or {option}`credentials`.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/${name}.env";
      description = ''
        A file of `NAME=value` lines read by systemd when ${name} starts
        (`EnvironmentFile=`), for secrets kept out of the Nix store. Give it
        as a string: a Nix path literal would be copied into the store.
        Its variables win over {option}`settings`.
      '';
    };

    credentials = mkOption {
      type = types.attrsOf types.str;
      default = {};
      example = {
        tls-key = "/run/secrets/${name}-tls.key";
      };
      description = ''
        Files handed to ${name} with systemd's `LoadCredential=NAME:PATH`
        (readable by its dynamic user, never copied into the store). Each
        appears as `/run/credentials/${name}.service/NAME`
        (`$CREDENTIALS_DIRECTORY`); point a `*_FILE` setting there.
      '';
    };
  };
in {
  options.services.virtufin = {
    enable = lib.mkEnableOption "the Virtufin services (virtufin-api, virtufin-websocketmanager, virtufin-workmanager)";

    package = mkOption {
      type = types.package;
      default = pkgs.virtufin;
      defaultText = literalExpression "pkgs.virtufin";
      description = ''
        The virtufin package: the three service binaries, the `virtufin`
        CLI and the systemd units (`lib/systemd/system`). The flake's
        modules default it to the flake's own package.
      '';
    };

    backend = mkOption {
      type = types.enum [
        "valkey"
        "dapr"
      ];
      default = "valkey";
      description = ''
        Where the api keeps state and events. `valkey`: directly in the
        local Valkey (`services.redis.servers.virtufin`). `dapr`: through a
        Dapr sidecar (`virtufin-daprd.service`, app-id `virtufin-api`)
        whose `statestore` (state.redis) and `pubsub` (pubsub.redis)
        components use that same Valkey. The layout in Valkey is the same
        either way, so switching needs no migration.
      '';
    };

    valkey = {
      port = mkOption {
        type = types.port;
        default = 6379;
        description = "TCP port of the local Valkey (bound to 127.0.0.1).";
      };

      passwordFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/valkey-password";
        description = ''
          File holding Valkey's password (`requirepass`, through
          {option}`services.redis.servers.virtufin.requirePassFile`): one
          line, no spaces or quotes. Give it as a string outside the Nix
          store. It reaches the client as a systemd credential
          (`LoadCredential=valkey-password:PATH`), never through the store:
          with the `valkey` backend the api reads it
          (`$CREDENTIALS_DIRECTORY/valkey-password`); with the `dapr`
          backend daprd's `statestore` and `pubsub` components read it
          from the secret store `virtufin-valkey`, a file the unit writes
          from the credential into its runtime directory at start.
        '';
      };
    };

    dapr = {
      package = mkOption {
        type = types.package;
        default = pkgs.daprd;
        defaultText = literalExpression "pkgs.daprd";
        description = "The daprd package (the flake builds it; nixpkgs has none).";
      };

      httpPort = mkOption {
        type = types.port;
        default = 3500;
        description = "daprd's HTTP port (`DAPR_HTTP_PORT`; `/v1.0/healthz`).";
      };

      grpcPort = mkOption {
        type = types.port;
        default = 50001;
        description = "daprd's gRPC port (`DAPR_GRPC_PORT`).";
      };

      secretsFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/virtufin-dapr.json";
        description = ''
          JSON file of secrets for daprd's local secret store
          (`secretstores.local.file`, component `virtufin-secrets`), handed
          to daprd with `LoadCredential=`, never copied into the store.
          Without it the secret store is empty. (Valkey's password does not
          go here: see {option}`services.virtufin.valkey.passwordFile`.)
        '';
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [];
        example = ["--log-level" "debug"];
        description = "Extra command-line arguments of daprd.";
      };
    };

    api = serviceOptions {
      name = "virtufin-api";
      description = "virtufin-api (state and pub/sub over gRPC)";
      httpPort = 5001;
      grpcPort = 5002;
      settingsExample = {
        RUST_LOG = "info,virtufin_api=debug";
        VIRTUFIN_STREAM_MAXLEN = 200000;
        VIRTUFIN_PROCESSING_TIMEOUT = "120s";
      };
    };

    websocketmanager = serviceOptions {
      name = "virtufin-websocketmanager";
      description = "virtufin-websocketmanager (outbound WebSocket connections)";
      httpPort = 5201;
      grpcPort = 5202;
      settingsExample = {
        VIRTUFIN_WS_MAX_CONNECTIONS = 5000;
        VIRTUFIN_WS_HEARTBEAT_INTERVAL = "5s";
      };
    };

    workmanager =
      serviceOptions {
        name = "virtufin-workmanager";
        description = "virtufin-workmanager (user workers on event topics)";
        httpPort = 5101;
        grpcPort = 5102;
        settingsExample = {
          VIRTUFIN_WM_MEMORY_LIMIT_MB = 1024;
          VIRTUFIN_WM_EVENT_TIMEOUT = "60s";
        };
      }
      // {
        python = mkOption {
          type = types.package;
          default = pkgs.python3;
          defaultText = literalExpression "pkgs.python3";
          example = literalExpression "pkgs.python3.withPackages (ps: [ ps.numpy ])";
          description = ''
            The Python that runs Python workers (`VIRTUFIN_WM_PYTHON` is set
            to its `bin/python3`); add the modules workers may import with
            `python3.withPackages`.
          '';
        };
      };
  };

  config = lib.mkIf cfg.enable {
    # The CLI (`virtufin smoke`, `virtufin state …`, `virtufin ws …`).
    environment.systemPackages = [cfg.package];
  };
}
