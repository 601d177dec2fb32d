# The NixOS options that the evaluated files (nixpkgs' systemd.nix and
# redis.nix, our modules, the chain test's node) set or read but that live
# in NixOS modules nixpkgs-sparse does not have. One stand-in per real
# nixpkgs file. Two of those files are small enough to load as they are
# when the nixpkgs tree has them (a full checkout, NIXPKGS=...): the
# firewall and the id tables (`useReal`); `needs` declares what the real
# one reads beyond what the others provide. The others pull in much more
# of NixOS (activation scripts, /etc, the system path) than this
# evaluation carries, so they stay stand-ins everywhere.
#
# Options our modules (or the chain test's node) set carry the real type,
# checked against the nixpkgs sources (see the README's "NixOS" section).
# Options only nixpkgs' own files touch are typed loosely (raw) — but
# declared one by one: nothing here is a catch-all that could swallow a
# misspelt option of ours.
{
  lib,
  nixpkgs,
}: let
  inherit (lib) mkOption types;
  opt = type: default: mkOption {inherit type default;};
  raw = opt types.raw null;
  loose = opt (types.lazyAttrsOf types.raw) {};

  standins = [
    {
      file = "nixos/modules/services/networking/firewall.nix";
      useReal = true;
      # Real: enable (bool, default true); allowedTCPPorts/allowedUDPPorts
      # (listOf port, sorted and deduplicated by `apply`).
      module = {
        options.networking.firewall = {
          enable = opt types.bool true;
          allowedTCPPorts = opt (types.listOf types.port) [];
          allowedUDPPorts = opt (types.listOf types.port) [];
        };
      };
      needs = {
        options.networking.nftables.enable = opt types.bool false;
        options.services.firewalld.enable = opt types.bool false;
        options.boot.kernelModules = opt (types.listOf types.str) [];
        options.boot.extraModprobeConfig = opt types.lines "";
        options.boot.kernelPackages = raw;
      };
    }
    {
      file = "nixos/modules/config/system-path.nix";
      module.options.environment.systemPackages = opt (types.listOf types.package) [];
    }
    {
      file = "nixos/modules/system/etc/etc.nix";
      # Real: attrsOf submodule; text is nullOr lines, source a path
      # (defaulting to a store file of `text`).
      module.options.environment.etc = opt (types.attrsOf (types.submodule ({
        name,
        config,
        ...
      }: {
        options = {
          enable = opt types.bool true;
          target = opt types.str name;
          text = opt (types.nullOr types.lines) null;
          source = mkOption {type = types.path;};
          mode = opt types.str "symlink";
        };
        config.source = lib.mkIf (config.text != null) (lib.mkDefault (builtins.toFile "etc-${baseNameOf name}" config.text));
      }))) {};
    }
    {
      file = "nixos/modules/config/users-groups.nix";
      # Real: users.users.<name> {name, description, uid (nullOr int),
      # isSystemUser, group, ...}; users.groups.<name> {name, gid, ...}.
      module.options.users = {
        users = opt (types.attrsOf (types.submodule ({name, ...}: {
          options = {
            name = opt types.str name;
            description = opt types.str "";
            uid = opt (types.nullOr types.int) null;
            isSystemUser = opt types.bool false;
            group = opt types.str "";
          };
        }))) {};
        groups = opt (types.attrsOf (types.submodule ({name, ...}: {
          options = {
            name = opt types.str name;
            gid = opt (types.nullOr types.int) null;
          };
        }))) {};
      };
    }
    {
      file = "nixos/modules/misc/ids.nix";
      useReal = true;
      module.options.ids = {
        uids = opt (types.attrsOf types.int) {};
        gids = opt (types.attrsOf types.int) {};
      };
    }
    {
      file = "nixos/modules/config/networking.nix";
      module.options.networking = {
        extraHosts = opt types.lines "";
        proxy.envVars = opt types.attrs {};
      };
    }
    {
      file = "nixos/modules/virtualisation/qemu-vm.nix";
      # Only the chain test's node sets these.
      module.options.virtualisation = {
        memorySize = opt types.ints.positive 1024;
        cores = opt types.ints.positive 1;
      };
    }
  ];

  # What nixpkgs' systemd.nix and redis.nix set or read and nothing of
  # ours touches (each from its own NixOS module, none of them here).
  rest = {
    options = {
      boot.isContainer = opt types.bool false;
      boot.extraSystemdUnitPaths = opt (types.listOf types.str) [];
      boot.kernel.sysctl = loose;
      services.dbus.enable = opt types.bool false;
      services.logrotate.settings = loose;
      services.openssh.enable = opt types.bool false;
      services.openssh.package = raw;
      system.build = loose;
      system.fsPackages = opt (types.listOf types.package) [];
      system.nssModules = opt (types.listOf types.raw) [];
      system.nssDatabases = loose;
      system.requiredKernelConfig = opt (types.listOf types.raw) [];
      lib = opt (types.attrsOf types.attrs) {};
    };
    config.lib.kernelConfig.isEnabled = name: {
      inherit name;
      tristate = "y";
    };
  };

  pick = s: let
    real = nixpkgs + "/${s.file}";
  in
    if (s.useReal or false) && builtins.pathExists real
    then {
      inherit (s) file;
      real = true;
      modules = [real] ++ lib.optional (s ? needs) s.needs;
    }
    else {
      inherit (s) file;
      real = false;
      modules = [s.module];
    };
  picked = map pick standins;
in {
  modules = lib.concatMap (p: p.modules) picked ++ [rest];
  # For the report: which files were real and which stood in for.
  sources = map (p: {inherit (p) file real;}) picked;
}
