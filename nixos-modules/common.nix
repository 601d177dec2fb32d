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
        Where the api keeps state and events. `valkey`: directly in
        Valkey — the local one (`services.redis.servers.virtufin`) or
        {option}`services.virtufin.valkey.external`. `dapr`: through a
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
          File holding Valkey's password: one line, no spaces or quotes.
          Give it as a string outside the Nix store. For the local Valkey
          it is also its `requirepass` (through
          {option}`services.redis.servers.virtufin.requirePassFile`); with
          {option}`services.virtufin.valkey.external` it is the password of
          that Valkey (of its primary and replicas with Sentinel). It
          reaches the client as a systemd credential
          (`LoadCredential=valkey-password:PATH`), never through the store:
          with the `valkey` backend the api reads it
          (`$CREDENTIALS_DIRECTORY/valkey-password`); with the `dapr`
          backend daprd's `statestore` and `pubsub` components read it
          from the secret store `virtufin-valkey`, a file the unit writes
          from the credential into its runtime directory at start.
        '';
      };

      external = {
        address = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "valkey.internal.example:6379";
          description = ''
            `HOST:PORT` of one Valkey run elsewhere (IPv6 in brackets), used
            instead of the local one: the module then runs no
            `services.redis.servers.virtufin`, and the api (and daprd) wait
            for `network-online.target` instead of requiring
            `redis-virtufin.service`. The api's `VIRTUFIN_VALKEY_URL` becomes
            `redis://[USER@]HOST:PORT`; daprd's components get it as
            `redisHost`. Not together with
            {option}`services.virtufin.valkey.external.sentinels`.
          '';
        };

        sentinels = mkOption {
          type = types.listOf types.str;
          default = [];
          example = ["10.0.0.1:26379" "10.0.0.2:26379" "10.0.0.3:26379"];
          description = ''
            `HOST:PORT` of the Valkey Sentinels that watch the primary
            {option}`services.virtufin.valkey.external.primaryName` (IPv6 in
            brackets); non-empty means Valkey is found through them and the
            local one is not run. The api gets
            `VIRTUFIN_VALKEY_URL=redis+sentinel://[USER@]S1,S2,…/PRIMARY` and
            follows a failover by itself. With the `dapr` backend daprd's
            `statestore` and `pubsub` get `failover: "true"`,
            `sentinelMasterName` and the Sentinels, comma-separated, as
            `redisHost`.
          '';
        };

        primaryName = mkOption {
          type = types.str;
          default = "virtufin";
          description = ''
            The name the Sentinels know the primary by (`sentinel monitor
            NAME …`).
          '';
        };

        username = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "virtufin";
          description = ''
            ACL user of the external Valkey (the password is
            {option}`services.virtufin.valkey.passwordFile`): in the api's URL
            (`USER@`), and daprd's `redisUsername`. Not a secret.
          '';
        };

        sentinelPasswordFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = "/run/secrets/valkey-sentinel-password";
          description = ''
            File holding the Sentinels' own password (their `requirepass`),
            when they have one; a string path outside the Nix store. Handed
            over like {option}`services.virtufin.valkey.passwordFile`: the
            api's credential `valkey-sentinel-password` (read by default),
            or daprd's, whose components take it as `sentinelPassword` from
            the secret store `virtufin-valkey`.
          '';
        };
      };

      minReplicas = mkOption {
        type = types.ints.unsigned;
        default = 0;
        example = 1;
        description = ''
          `VIRTUFIN_VALKEY_MIN_REPLICAS` of the api (`valkey` backend): a
          state write or a publish is confirmed only once this many replicas
          have it (Valkey's `WAIT`), else the caller gets UNAVAILABLE. 0
          confirms once the primary has it (Dapr's behaviour). The `dapr`
          backend cannot do this (daprd's components do not `WAIT`): an
          assertion refuses it there.
        '';
      };

      waitTimeout = mkOption {
        type = types.str;
        default = "1s";
        example = "500ms";
        description = ''
          `VIRTUFIN_VALKEY_WAIT_TIMEOUT`: how long the api waits for
          {option}`services.virtufin.valkey.minReplicas` replicas before
          answering UNAVAILABLE (set only when minReplicas is above 0).
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
