# virtufin-websocketmanager. The unit is systemd/virtufin-websocketmanager.service
# from the package (`systemd.packages`): After=/Wants= the api, Type=notify,
# watchdog and hardening are defined there only; this module adds the
# drop-in with the environment and wantedBy.
{
  config,
  lib,
  ...
}: let
  inherit (lib) mkDefault mkIf optional;
  vlib = import ./lib.nix {inherit lib;};
  cfg = config.services.virtufin;
  svc = cfg.websocketmanager;
in {
  imports = [./common.nix];

  config = mkIf (cfg.enable && svc.enable) {
    systemd.packages = [cfg.package];

    services.virtufin.websocketmanager.settings = lib.mapAttrs (_: mkDefault) {
      ASPNETCORE_URLS = "http://${vlib.urlHost svc.listenAddress}:${toString svc.httpPort}";
      VIRTUFIN_GRPC_HOST = svc.listenAddress;
      VIRTUFIN_GRPC_PORT = svc.grpcPort;
      # The api on this host; set both to reach one elsewhere.
      VIRTUFIN_API_HOST = vlib.localAddress cfg.api.listenAddress;
      VIRTUFIN_API_GRPC_PORT = cfg.api.grpcPort;
      RUST_LOG = "info";
    };

    systemd.services.virtufin-websocketmanager = {
      wantedBy = ["multi-user.target"];
      environment = vlib.toEnvironment svc.settings;
      serviceConfig = {
        EnvironmentFile = optional (svc.environmentFile != null) svc.environmentFile;
        LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") svc.credentials;
      };
    };

    networking.firewall.allowedTCPPorts = optional svc.openFirewall svc.httpPort ++ optional svc.openFirewall svc.grpcPort;
  };
}
