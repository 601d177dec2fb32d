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
