# The configurations the evaluation checks, each with what must come out.
# Fields (all but name and modules optional; checks.nix has the defaults):
#   assertions, warnings  substrings: exactly these must fail / be emitted
#                         (a case with assertions stops there, as NixOS would)
#   services              which of api/websocketmanager/workmanager run
#   backend, valkeyPort, dapr.{http,grpc,extraArgs,secretsFile}
#   listen.<svc>, http.<svc>, grpc.<svc>   the listeners
#   apiHost, apiPort      what the websocketmanager/workmanager are told
#   gateway               [{name, host, port}] in the api's services file
#   firewall              the open TCP ports
#   env.<svc>.<NAME>      a value, or null for "not set"
#   environmentFile.<svc>, credentials.<svc> (["name:path"]), password
#   external              valkey.external's expected rendering: { url;
#                         redisHost; meta (daprd's extra metadata);
#                         sentinelPassword } (no local Valkey then)
#   redisServers          the redis module's enabled servers (default:
#                         ["virtufin"], none with external)
#   extra                 [{what; expected; found}]: further comparisons
{
  lib,
  flake,
  repo,
  # A directory of secret files (made by run.sh, holding canaries); only
  # their paths appear here.
  secrets,
}: let
  on = {services.virtufin.enable = true;};
  stack = extra: [flake.nixosModules.default on extra];
  m = flake.nixosModules;
  all = ["api" "websocketmanager" "workmanager"];

  # The flake's modules, pairwise, on both backends.
  moduleNames = ["default" "api" "websocketmanager" "workmanager"];
  servicesOf = name:
    if name == "default"
    then all
    else [name];
  pairs = lib.concatLists (lib.imap0 (i: a: map (b: [a b]) (lib.drop (i + 1) moduleNames)) moduleNames);
  pairCase = backend: pair: let
    services = lib.unique (lib.concatMap servicesOf pair);
    apiHere = lib.elem "api" services;
  in {
    name = "pair/${lib.concatStringsSep "+" pair}/${backend}";
    modules =
      map (n: m.${n}) pair
      ++ [
        on
        {services.virtufin.backend = backend;}
      ];
    inherit backend services;
    warnings = lib.optionals (!apiHere) (map (_: "virtufin-api does not run on this host") (lib.remove "api" services));
  };
in
  [
    {
      name = "stack/valkey";
      modules = stack {};
    }
    {
      name = "stack/dapr";
      modules = stack {services.virtufin.backend = "dapr";};
      backend = "dapr";
    }
    {
      # nixos-modules/ without the flake: the package comes from the overlay.
      name = "stack/without-flake";
      modules = [(repo + "/nixos-modules") on];
    }
    {
      name = "disabled";
      modules = [m.default];
      services = [];
    }
    {
      name = "stack/api-disabled";
      modules = stack {services.virtufin.api.enable = false;};
      services = ["websocketmanager" "workmanager"];
      warnings = ["virtufin-websocketmanager connects to the api at 127.0.0.1:5002" "virtufin-workmanager connects to the api at 127.0.0.1:5002"];
    }
  ]
  # Each service alone (one flake module).
  ++ [
    {
      name = "alone/api/valkey";
      modules = [m.api on];
      services = ["api"];
    }
    {
      name = "alone/api/dapr";
      modules = [m.api on {services.virtufin.backend = "dapr";}];
      services = ["api"];
      backend = "dapr";
    }
    {
      name = "alone/websocketmanager";
      modules = [m.websocketmanager on];
      services = ["websocketmanager"];
      warnings = ["virtufin-websocketmanager connects to the api at 127.0.0.1:5002, but virtufin-api does not run on this host"];
    }
    {
      name = "alone/workmanager";
      modules = [m.workmanager on];
      services = ["workmanager"];
      warnings = ["virtufin-workmanager connects to the api at 127.0.0.1:5002, but virtufin-api does not run on this host"];
    }
    {
      # The api elsewhere, by host name: the client resolves it.
      name = "alone/websocketmanager/remote-api-hostname";
      modules = [
        m.websocketmanager
        on
        {
          services.virtufin.websocketmanager.settings = {
            VIRTUFIN_API_HOST = "api.internal.example";
            VIRTUFIN_API_GRPC_PORT = 7002;
          };
        }
      ];
      services = ["websocketmanager"];
      apiHost = "api.internal.example";
      apiPort = 7002;
    }
    {
      name = "alone/workmanager/remote-api-ipv6-unbracketed";
      modules = [m.workmanager on {services.virtufin.workmanager.settings.VIRTUFIN_API_HOST = "2001:db8::5";}];
      assertions = [''settings.VIRTUFIN_API_HOST = "2001:db8::5" is an IPv6 address without brackets: virtufin-workmanager connects to http://HOST:PORT, so write "[2001:db8::5]"''];
    }
  ]
  ++ map (pairCase "valkey") pairs
  ++ map (pairCase "dapr") pairs
  # Listen addresses and the firewall.
  ++ [
    {
      name = "listen/ipv4";
      modules = stack {services.virtufin.api.listenAddress = "10.1.2.3";};
      listen.api = "10.1.2.3";
      apiHost = "10.1.2.3";
    }
    {
      name = "listen/ipv6-loopback";
      modules = stack {
        services.virtufin.api.listenAddress = "::1";
        services.virtufin.workmanager.listenAddress = "::1";
      };
      listen = {
        api = "::1";
        workmanager = "::1";
      };
      apiHost = "[::1]";
    }
    {
      name = "listen/any-and-firewall";
      modules = stack {
        services.virtufin.api = {
          listenAddress = "0.0.0.0";
          openFirewall = true;
        };
        services.virtufin.websocketmanager = {
          listenAddress = "::";
          openFirewall = true;
        };
      };
      listen = {
        api = "0.0.0.0";
        websocketmanager = "::";
      };
      apiHost = "127.0.0.1";
      firewall = [5001 5002 5201 5202];
    }
    {
      name = "listen/ipv6-any";
      modules = stack {services.virtufin.api.listenAddress = "::";};
      listen.api = "::";
      apiHost = "[::1]";
    }
    {
      name = "listen/hostname";
      modules = stack {services.virtufin.api.listenAddress = "api.example.org";};
      assertions = [''services.virtufin.api.listenAddress = "api.example.org" is not an IP address''];
    }
    {
      name = "firewall/loopback";
      modules = stack {services.virtufin.workmanager.openFirewall = true;};
      firewall = [5101 5102];
      warnings = ["services.virtufin.workmanager.openFirewall opens ports 5101 and 5102"];
    }
  ]
  # Ports: options are the single source; settings may not contradict them.
  ++ [
    {
      name = "ports/options/valkey";
      modules = stack {
        services.virtufin = {
          valkey.port = 6380;
          api = {
            httpPort = 6001;
            grpcPort = 6002;
            openFirewall = true;
            listenAddress = "0.0.0.0";
          };
          websocketmanager.grpcPort = 6202;
        };
      };
      valkeyPort = 6380;
      http.api = 6001;
      grpc = {
        api = 6002;
        websocketmanager = 6202;
      };
      listen.api = "0.0.0.0";
      apiHost = "127.0.0.1";
      apiPort = 6002;
      firewall = [6001 6002];
    }
    {
      name = "ports/options/dapr";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey.port = 6380;
          dapr = {
            httpPort = 3510;
            grpcPort = 50011;
            extraArgs = ["--log-level" "debug"];
          };
        };
      };
      backend = "dapr";
      valkeyPort = 6380;
      dapr = {
        http = 3510;
        grpc = 50011;
        extraArgs = ["--log-level" "debug"];
      };
    }
    {
      name = "ports/settings/api-grpc";
      modules = stack {services.virtufin.api.settings.VIRTUFIN_GRPC_PORT = 6002;};
      assertions = ["services.virtufin.api.settings.VIRTUFIN_GRPC_PORT = 6002 contradicts services.virtufin.api.grpcPort = 5002"];
    }
    {
      name = "ports/settings/websocketmanager-grpc-and-http";
      modules = stack {
        services.virtufin.websocketmanager.settings = {
          VIRTUFIN_GRPC_PORT = "6202";
          VIRTUFIN_HTTP_PORT = 6201;
        };
      };
      assertions = [
        ''services.virtufin.websocketmanager.settings.VIRTUFIN_GRPC_PORT = "6202" contradicts services.virtufin.websocketmanager.grpcPort = 5202''
        "services.virtufin.websocketmanager.settings.VIRTUFIN_HTTP_PORT = 6201 contradicts services.virtufin.websocketmanager.httpPort = 5201"
      ];
    }
    {
      name = "ports/settings/urls-other-port";
      modules = stack {services.virtufin.workmanager.settings.ASPNETCORE_URLS = "http://127.0.0.1:7101";};
      assertions = [''services.virtufin.workmanager.settings.ASPNETCORE_URLS = "http://127.0.0.1:7101" contradicts services.virtufin.workmanager.httpPort = 5101''];
    }
    {
      # Several listen URLs on the module's port are the user's business.
      name = "ports/settings/urls-same-port";
      modules = stack {services.virtufin.api.settings.ASPNETCORE_URLS = "http://127.0.0.1:5001;http://[::1]:5001";};
      env.api.ASPNETCORE_URLS = "http://127.0.0.1:5001;http://[::1]:5001";
    }
    {
      name = "ports/settings/grpc-host";
      modules = stack {services.virtufin.api.settings.VIRTUFIN_GRPC_HOST = "::1";};
      assertions = [''services.virtufin.api.settings.VIRTUFIN_GRPC_HOST = "::1" contradicts services.virtufin.api.listenAddress = "127.0.0.1"''];
    }
    {
      name = "ports/settings/dapr";
      modules = stack {
        services.virtufin.backend = "dapr";
        services.virtufin.api.settings.DAPR_GRPC_PORT = 50002;
      };
      assertions = ["services.virtufin.api.settings.DAPR_GRPC_PORT = 50002 contradicts services.virtufin.dapr.grpcPort = 50001"];
    }
    {
      name = "settings/backend";
      modules = stack {services.virtufin.api.settings.VIRTUFIN_BACKEND = "memory";};
      assertions = [''services.virtufin.api.settings.VIRTUFIN_BACKEND = "memory" contradicts services.virtufin.backend = "valkey"''];
    }
    {
      name = "settings/overrides";
      modules = stack {
        services.virtufin.api.settings = {
          RUST_LOG = "info,virtufin_api=debug";
          VIRTUFIN_STREAM_MAXLEN = 200000;
          VIRTUFIN_CORS_ORIGINS = "https://app.example.com";
        };
        services.virtufin.websocketmanager.settings = {
          RUST_LOG = null;
          VIRTUFIN_WS_HEARTBEAT_INTERVAL = "5s";
        };
        services.virtufin.workmanager.settings.VIRTUFIN_WM_ALLOW_LOOPBACK = true;
      };
      env = {
        api = {
          RUST_LOG = "info,virtufin_api=debug";
          VIRTUFIN_STREAM_MAXLEN = "200000";
          VIRTUFIN_CORS_ORIGINS = "https://app.example.com";
        };
        websocketmanager = {
          RUST_LOG = null;
          VIRTUFIN_WS_HEARTBEAT_INTERVAL = "5s";
        };
        workmanager.VIRTUFIN_WM_ALLOW_LOOPBACK = "true";
      };
    }
  ]
  # Secrets: files outside the store, handed over by systemd.
  ++ [
    {
      name = "secrets/environment-files-and-credentials";
      modules = stack {
        services.virtufin = {
          api.environmentFile = "${secrets}/api.env";
          api.credentials.api-keys = "${secrets}/api-keys.yaml";
          websocketmanager.environmentFile = "${secrets}/websocketmanager.env";
          websocketmanager.credentials.api-key = "${secrets}/api-key";
          workmanager.credentials.api-key = "${secrets}/api-key";
        };
      };
      environmentFile = {
        api = "${secrets}/api.env";
        websocketmanager = "${secrets}/websocketmanager.env";
      };
      credentials = {
        api = ["api-keys:${secrets}/api-keys.yaml"];
        websocketmanager = ["api-key:${secrets}/api-key"];
        workmanager = ["api-key:${secrets}/api-key"];
      };
    }
    {
      name = "secrets/environment-file-in-store";
      modules = stack {services.virtufin.api.environmentFile = builtins.toFile "api.env" "X=1";};
      assertions = ["services.virtufin.api.environmentFile = \"${builtins.storeDir}/"];
    }
    {
      name = "secrets/valkey-password/valkey";
      modules = stack {services.virtufin.valkey.passwordFile = "${secrets}/valkey-password";};
      password = "${secrets}/valkey-password";
      credentials.api = ["valkey-password:${secrets}/valkey-password"];
    }
    {
      # A Nix path literal: read where it is, never copied into the store.
      name = "secrets/valkey-password/valkey-path-literal";
      modules = stack {services.virtufin.valkey.passwordFile = /. + "${secrets}/valkey-password";};
      password = "${secrets}/valkey-password";
      credentials.api = ["valkey-password:${secrets}/valkey-password"];
    }
    {
      name = "secrets/valkey-password/dapr";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey.passwordFile = "${secrets}/valkey-password";
          dapr.secretsFile = "${secrets}/dapr-secrets.json";
        };
      };
      backend = "dapr";
      password = "${secrets}/valkey-password";
      dapr.secretsFile = "${secrets}/dapr-secrets.json";
    }
    {
      name = "secrets/valkey-password/in-store";
      modules = stack {services.virtufin.valkey.passwordFile = builtins.toFile "valkey-password" "not-a-secret";};
      assertions = ["services.virtufin.valkey.passwordFile = \"${builtins.storeDir}/"];
    }
    {
      name = "secrets/valkey-url-with-password";
      modules = stack {services.virtufin.api.settings.VIRTUFIN_VALKEY_URL = "redis://:hunter2@127.0.0.1:6379";};
      assertions = ["services.virtufin.api.settings.VIRTUFIN_VALKEY_URL carries a password"];
    }
  ]
  # Valkey elsewhere: one address, or Sentinels (valkey.external).
  ++ [
    {
      name = "external/address/valkey";
      modules = stack {
        services.virtufin.valkey = {
          external.address = "valkey.internal.example:6380";
          passwordFile = "${secrets}/valkey-password";
        };
      };
      external = {
        url = "redis://valkey.internal.example:6380";
        redisHost = "valkey.internal.example:6380";
      };
      password = "${secrets}/valkey-password";
      credentials.api = ["valkey-password:${secrets}/valkey-password"];
    }
    {
      name = "external/address/dapr-acl-user";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey = {
            external.address = "[2001:db8::7]:6379";
            external.username = "virtufin";
            passwordFile = "${secrets}/valkey-password";
          };
        };
      };
      backend = "dapr";
      external = {
        url = null;
        redisHost = "[2001:db8::7]:6379";
        meta.redisUsername = "virtufin";
      };
      password = "${secrets}/valkey-password";
    }
    {
      name = "external/sentinel/valkey";
      modules = stack {
        services.virtufin.valkey = {
          external.sentinels = ["10.0.0.1:26379" "10.0.0.2:26379" "10.0.0.3:26379"];
          external.sentinelPasswordFile = "${secrets}/valkey-sentinel-password";
          passwordFile = "${secrets}/valkey-password";
          minReplicas = 1;
          waitTimeout = "2s";
        };
      };
      external = {
        url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/virtufin";
        sentinelPassword = "${secrets}/valkey-sentinel-password";
      };
      password = "${secrets}/valkey-password";
      credentials.api = [
        "valkey-password:${secrets}/valkey-password"
        "valkey-sentinel-password:${secrets}/valkey-sentinel-password"
      ];
      env.api = {
        VIRTUFIN_VALKEY_MIN_REPLICAS = "1";
        VIRTUFIN_VALKEY_WAIT_TIMEOUT = "2s";
      };
    }
    {
      name = "external/sentinel/valkey-acl-user-ipv6-no-passwords";
      modules = stack {
        services.virtufin.valkey.external = {
          sentinels = ["[2001:db8::1]:26379" "sentinel.example:26379"];
          primaryName = "store-a";
          username = "virtufin";
        };
      };
      external.url = "redis+sentinel://virtufin@[2001:db8::1]:26379,sentinel.example:26379/store-a";
    }
    {
      name = "external/sentinel/dapr";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey = {
            external.sentinels = ["10.0.0.2:26379" "10.0.0.1:26379" "10.0.0.3:26379"];
            external.primaryName = "store-a";
            external.sentinelPasswordFile = "${secrets}/valkey-sentinel-password";
            passwordFile = "${secrets}/valkey-password";
          };
        };
      };
      backend = "dapr";
      external = {
        url = null;
        redisHost = "10.0.0.2:26379,10.0.0.1:26379,10.0.0.3:26379";
        meta = {
          failover = "true";
          sentinelMasterName = "store-a";
        };
        sentinelPassword = "${secrets}/valkey-sentinel-password";
      };
      password = "${secrets}/valkey-password";
    }
    {
      name = "external/sentinel/dapr-only-sentinel-password";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey.external.sentinels = ["10.0.0.1:26379"];
          valkey.external.sentinelPasswordFile = "${secrets}/valkey-sentinel-password";
        };
      };
      backend = "dapr";
      external = {
        url = null;
        redisHost = "10.0.0.1:26379";
        meta = {
          failover = "true";
          sentinelMasterName = "virtufin";
        };
        sentinelPassword = "${secrets}/valkey-sentinel-password";
      };
    }
    {
      # minReplicas on the local Valkey (replicas the operator added).
      name = "min-replicas/local";
      modules = stack {services.virtufin.valkey.minReplicas = 2;};
      env.api = {
        VIRTUFIN_VALKEY_MIN_REPLICAS = "2";
        VIRTUFIN_VALKEY_WAIT_TIMEOUT = "1s";
      };
    }
    {
      name = "external/refused/address-and-sentinels";
      modules = stack {
        services.virtufin.valkey.external = {
          address = "10.0.0.1:6379";
          sentinels = ["10.0.0.1:26379"];
        };
      };
      assertions = ["services.virtufin.valkey.external.address and services.virtufin.valkey.external.sentinels are both set"];
    }
    {
      name = "external/refused/no-port";
      modules = stack {services.virtufin.valkey.external.sentinels = ["10.0.0.1:26379" "10.0.0.2" "redis://10.0.0.3:26379"];};
      assertions = [''services.virtufin.valkey.external: ["10.0.0.2","redis://10.0.0.3:26379"] is not HOST:PORT''];
    }
    {
      name = "external/refused/primary-name";
      modules = stack {
        services.virtufin.valkey.external = {
          sentinels = ["10.0.0.1:26379"];
          primaryName = "a/b";
        };
      };
      assertions = [''services.virtufin.valkey.external.primaryName = "a/b" is not a Sentinel primary name''];
    }
    {
      name = "external/refused/sentinel-password-in-store";
      modules = stack {
        services.virtufin.valkey.external = {
          sentinels = ["10.0.0.1:26379"];
          sentinelPasswordFile = builtins.toFile "valkey-sentinel-password" "not-a-secret";
        };
      };
      assertions = ["services.virtufin.valkey.external.sentinelPasswordFile = \"${builtins.storeDir}/"];
    }
    {
      name = "external/refused/sentinel-password-without-sentinels";
      modules = stack {services.virtufin.valkey.external.sentinelPasswordFile = "${secrets}/valkey-sentinel-password";};
      assertions = ["services.virtufin.valkey.external.sentinelPasswordFile is set but services.virtufin.valkey.external.sentinels is empty"];
    }
    {
      name = "external/refused/username-on-local";
      modules = stack {services.virtufin.valkey.external.username = "virtufin";};
      assertions = [''services.virtufin.valkey.external.username = "virtufin" needs services.virtufin.valkey.external.address or .sentinels''];
    }
    {
      name = "external/refused/min-replicas-on-dapr";
      modules = stack {
        services.virtufin = {
          backend = "dapr";
          valkey.external.sentinels = ["10.0.0.1:26379"];
          valkey.minReplicas = 1;
        };
      };
      assertions = [''services.virtufin.valkey.minReplicas = 1 needs backend = "valkey"''];
    }
    {
      name = "external/refused/url-in-settings";
      modules = stack {
        services.virtufin.valkey.external.sentinels = ["10.0.0.1:26379"];
        services.virtufin.api.settings.VIRTUFIN_VALKEY_URL = "redis://10.0.0.9:6379";
      };
      assertions = [''services.virtufin.api.settings.VIRTUFIN_VALKEY_URL = "redis://10.0.0.9:6379" contradicts services.virtufin.valkey.external = "redis+sentinel://10.0.0.1:26379/virtufin"''];
    }
  ]
  # The README's three-host configuration (nixos-modules/examples), each host.
  ++ map (self: let
    others = lib.remove self ["10.0.0.1" "10.0.0.2" "10.0.0.3"];
  in {
    name = "three-hosts/${self}";
    modules = [
      flake.nixosModules.default
      (import (repo + "/nixos-modules/examples/three-hosts.nix") self)
    ];
    external = {
      url = "redis+sentinel://${lib.concatMapStringsSep "," (h: "${h}:26379") ([self] ++ others)}/virtufin";
    };
    password = "/run/secrets/valkey-password";
    credentials.api = ["valkey-password:/run/secrets/valkey-password"];
    env.api = {
      VIRTUFIN_VALKEY_MIN_REPLICAS = "1";
      VIRTUFIN_VALKEY_WAIT_TIMEOUT = "1s";
    };
    firewall = [6379 26379];
    # The host's own Valkey and Sentinel (the example's, not the module's).
    redisServers = ["virtufin-store"];
    extra = r: let
      # A unit's Key= value, and the store file a script/ config names.
      entry = text: key: let
        l = lib.filter (lib.hasPrefix "${key}=") (lib.splitString "\n" text);
      in
        if l == []
        then null
        else lib.removePrefix "${key}=" (lib.last l);
      named = pattern: text: let
        m = builtins.match ".*(${builtins.storeDir}/[0-9a-z]{32}-${pattern}).*" (toString text);
      in
        if m == null
        then null
        else r.readStoreFile (builtins.head m);
      lines = text: lib.filter (l: l != "") (map lib.trim (lib.splitString "\n" (toString text)));
      sentinel = r.otherUnits."valkey-sentinel.service" or "";
      store = r.otherUnits."redis-virtufin-store.service" or "";
      seed = named "valkey-sentinel-seed.conf" (named "valkey-sentinel-seed" (entry sentinel "ExecStartPre"));
      storeConf = lines (named "redis.conf" (named "redis-virtufin-store-prep-conf" (entry store "ExecStartPre")));
    in [
      {
        what = "README.md shows nixos-modules/examples/three-hosts.nix verbatim";
        expected = true;
        found = lib.hasInfix "```nix\n${builtins.readFile (repo + "/nixos-modules/examples/three-hosts.nix")}```" (builtins.readFile (repo + "/README.md"));
      }
      {
        what = "the Sentinel's ExecStart= (a config it can rewrite)";
        expected = true;
        found = lib.hasSuffix "-valkey/bin/valkey-server /var/lib/valkey-sentinel/sentinel.conf --sentinel" (toString (entry sentinel "ExecStart"));
      }
      {
        what = "the Sentinel's LoadCredential=";
        expected = "valkey-password:/run/secrets/valkey-password";
        found = entry sentinel "LoadCredential";
      }
      {
        what = "the Sentinel's seed config";
        expected = [
          "port 26379"
          "bind ${self} 127.0.0.1"
          "sentinel announce-ip ${self}"
          "supervised systemd"
          "sentinel monitor virtufin 10.0.0.1 6379 2"
          "sentinel down-after-milliseconds virtufin 5000"
          "sentinel failover-timeout virtufin 60000"
        ];
        found = lines seed;
      }
      {
        # No static slaveof: Sentinel moves the primary (see the example).
        what = "the host's Valkey: bind, announce, masterauth include, no slaveof";
        expected = lib.sort lib.lessThan ["bind ${self} 127.0.0.1" "include /run/secrets/valkey-masterauth.conf" "replica-announce-ip ${self}" "appendOnly yes"];
        found = lib.sort lib.lessThan (lib.filter (l: lib.any (k: lib.hasPrefix "${k} " l) ["bind" "include" "replica-announce-ip" "appendOnly" "slaveof" "masterauth" "requirepass"]) storeConf);
      }
    ];
  }) ["10.0.0.1" "10.0.0.2" "10.0.0.3"]
