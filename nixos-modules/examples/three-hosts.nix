# One host of three (10.0.0.1-3 on a private network), each running the
# trio, one Valkey and one Sentinel: Valkey's primary starts on 10.0.0.1 and
# the two others replicate it; the three Sentinels (quorum 2) promote a
# replica when the primary is gone, and every api follows them. Import it
# with the host's address, next to virtufin.nixosModules.default:
#   (import ./three-hosts.nix "10.0.0.2")
# The secrets are files outside the store (sops-nix, agenix, …):
# /run/secrets/valkey-password (the password) and
# /run/secrets/valkey-masterauth.conf (one line: masterauth <the password>).
#
# Replication is started once by hand, on 10.0.0.2 and 10.0.0.3:
#   valkey-cli -a "$(cat /run/secrets/valkey-password)" REPLICAOF 10.0.0.1 6379
#   valkey-cli -a "$(cat /run/secrets/valkey-password)" CONFIG REWRITE
# and from then on by Sentinel. Not with the redis module's slaveOf: it
# would be in the config for good, and the primary Sentinel promoted
# would come back from a restart as a replica of the old one (both
# replicas, no primary, until Sentinel's next failover).
self: {
  lib,
  pkgs,
  ...
}: let
  hosts = ["10.0.0.1" "10.0.0.2" "10.0.0.3"];
  primary = "10.0.0.1"; # at first; Sentinel moves it
  password = "/run/secrets/valkey-password";

  # Sentinel rewrites its own config (the current primary, the replicas and
  # Sentinels it found), so the store holds only the seed, copied once.
  sentinelSeed = pkgs.writeText "valkey-sentinel-seed.conf" ''
    port 26379
    bind ${self} 127.0.0.1
    sentinel announce-ip ${self}
    supervised systemd
    sentinel monitor virtufin ${primary} 6379 2
    sentinel down-after-milliseconds virtufin 5000
    sentinel failover-timeout virtufin 60000
  '';
  sentinelConf = "/var/lib/valkey-sentinel/sentinel.conf";
in {
  services.virtufin = {
    enable = true;
    valkey = {
      passwordFile = password;
      # All three Sentinels, this host's first.
      external.sentinels = map (h: "${h}:26379") ([self] ++ lib.remove self hosts);
      external.primaryName = "virtufin";
      # An acknowledged write or event is on at least one replica.
      minReplicas = 1;
    };
  };

  # This host's Valkey: the redis module of NixOS, reachable by the others.
  services.redis.package = pkgs.valkey;
  services.redis.servers.virtufin-store = {
    enable = true;
    bind = "${self} 127.0.0.1";
    port = 6379;
    appendOnly = true;
    requirePassFile = password;
    settings = {
      replica-announce-ip = self;
      # masterauth from a file outside the store (every member may become
      # a replica); the module's own masterAuth would be in the store.
      include = "/run/secrets/valkey-masterauth.conf";
    };
  };

  # This host's Sentinel (the redis module has none).
  systemd.services.valkey-sentinel = {
    description = "Valkey Sentinel of the primary virtufin";
    wantedBy = ["multi-user.target"];
    wants = ["network-online.target"];
    after = ["network-online.target"];
    serviceConfig = {
      Type = "notify";
      DynamicUser = true;
      StateDirectory = "valkey-sentinel";
      UMask = "0077";
      LoadCredential = ["valkey-password:${password}"];
      ExecStartPre = pkgs.writeShellScript "valkey-sentinel-seed" ''
        if [ ! -s ${sentinelConf} ]; then
          { cat ${sentinelSeed}
            printf 'sentinel auth-pass virtufin %s\n' "$(tr -d '[:space:]' < "$CREDENTIALS_DIRECTORY/valkey-password")"
          } > ${sentinelConf}
        fi
      '';
      ExecStart = "${pkgs.valkey}/bin/valkey-server ${sentinelConf} --sentinel";
      Restart = "on-failure";
    };
  };

  networking.firewall.allowedTCPPorts = [6379 26379];
}
