# virtufin-websocketmanager. The unit is systemd/virtufin-websocketmanager.service
# from the package (`systemd.packages`): After=/Wants= the api, Type=notify,
# watchdog and hardening are defined there only; this module adds the
# drop-in with the environment and wantedBy.
{
  config,
  lib,
  ...
}: let
  inherit (lib) mkDefault mkIf mkMerge optional optionals;
  vlib = import ./lib.nix {inherit lib;};
  cfg = config.services.virtufin;
  svc = cfg.websocketmanager;
  apiRuns = cfg.api.enable && cfg.api.imported;
  checks = vlib.serviceChecks "services.virtufin.websocketmanager" "virtufin-websocketmanager" svc;
  clientChecks = vlib.apiClientChecks "services.virtufin.websocketmanager" "virtufin-websocketmanager" svc apiRuns;
in {
  imports = [./common.nix];

  config = mkMerge [
    {services.virtufin.websocketmanager.imported = true;}

    (mkIf (cfg.enable && svc.enable) {
      assertions = checks.assertions ++ clientChecks.assertions;
      warnings = checks.warnings ++ clientChecks.warnings;

      systemd.packages = [cfg.package];
      # Socket activation: the listeners, at the module's address and ports.
      systemd.sockets = vlib.socketUnits "virtufin-websocketmanager" svc;

      services.virtufin.websocketmanager.settings = lib.mapAttrs (_: mkDefault) {
        ASPNETCORE_URLS = "http://${vlib.urlHost svc.listenAddress}:${toString svc.httpPort}";
        VIRTUFIN_GRPC_HOST = svc.listenAddress;
        VIRTUFIN_GRPC_PORT = svc.grpcPort;
        # The api on this host (IPv6 in brackets: the client builds
        # http://HOST:PORT); set both to reach one elsewhere.
        VIRTUFIN_API_HOST = vlib.urlHost (vlib.localAddress cfg.api.listenAddress);
        VIRTUFIN_API_GRPC_PORT = cfg.api.grpcPort;
        RUST_LOG = "info";
      };

      systemd.services.virtufin-websocketmanager = {
        wantedBy = ["multi-user.target"];
        environment = vlib.toEnvironment svc.settings;
        serviceConfig = {
          EnvironmentFile = optional (svc.environmentFile != null) (toString svc.environmentFile);
          LoadCredential = lib.mapAttrsToList (name: path: "${name}:${toString path}") svc.credentials;
        };
      };

      networking.firewall.allowedTCPPorts = optionals svc.openFirewall [svc.httpPort svc.grpcPort];
    })
  ];
}
