# virtufin-workmanager. The unit is systemd/virtufin-workmanager.service
# from the package (`systemd.packages`): After=/Wants= the api, Type=notify,
# watchdog and hardening (with @resources for the workers' setrlimit) are
# defined there only; this module adds the drop-in with the environment
# (including the Python that runs workers) and wantedBy.
{
  config,
  lib,
  ...
}: let
  inherit (lib) mkDefault mkIf mkMerge optional optionals;
  vlib = import ./lib.nix {inherit lib;};
  cfg = config.services.virtufin;
  svc = cfg.workmanager;
  apiRuns = cfg.api.enable && cfg.api.imported;
  checks = vlib.serviceChecks "services.virtufin.workmanager" "virtufin-workmanager" svc;
  clientChecks = vlib.apiClientChecks "services.virtufin.workmanager" "virtufin-workmanager" svc apiRuns;
in {
  imports = [./common.nix];

  config = mkMerge [
    {services.virtufin.workmanager.imported = true;}

    (mkIf (cfg.enable && svc.enable) {
      assertions = checks.assertions ++ clientChecks.assertions;
      warnings = checks.warnings ++ clientChecks.warnings;

      systemd.packages = [cfg.package];
      # Socket activation: the listeners, at the module's address and ports.
      systemd.sockets = vlib.socketUnits "virtufin-workmanager" svc;

      services.virtufin.workmanager.settings = lib.mapAttrs (_: mkDefault) {
        ASPNETCORE_URLS = "http://${vlib.urlHost svc.listenAddress}:${toString svc.httpPort}";
        VIRTUFIN_GRPC_HOST = svc.listenAddress;
        VIRTUFIN_GRPC_PORT = svc.grpcPort;
        # The api on this host (IPv6 in brackets: the client builds
        # http://HOST:PORT); set both to reach one elsewhere.
        VIRTUFIN_API_HOST = vlib.urlHost (vlib.localAddress cfg.api.listenAddress);
        VIRTUFIN_API_GRPC_PORT = cfg.api.grpcPort;
        # The unit's comment says python3 from /usr/bin: NixOS has none there.
        VIRTUFIN_WM_PYTHON = "${svc.python}/bin/python3";
        RUST_LOG = "info";
      };

      systemd.services.virtufin-workmanager = {
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
