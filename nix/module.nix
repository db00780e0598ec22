# NixOS module: services.corral.enable, services.corral.policy.
self:
{ config, lib, pkgs, ... }:

let
  cfg = config.services.corral;
  toml = pkgs.formats.toml { };
in {
  options.services.corral = {
    enable = lib.mkEnableOption "corral, the eBPF-assisted scheduler agent";
    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.system}.corral;
      description = "The corral package.";
    };
    policy = lib.mkOption {
      type = toml.type;
      default = { };
      example = { classes.game.cpu_weight = 2000; };
      description = ''
        Overrides of the shipped default policy, written to
        /etc/corral/policy.toml (wins key by key over
        share/corral/default.toml).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."corral/policy.toml".source = toml.generate "corral-policy.toml" cfg.policy;
    systemd.packages = [ cfg.package ];
    # AllowedCPUs= on the class slices of each user's manager needs the
    # cpuset controller delegated to user@.service (packaging/user@.service.d-corral.conf).
    systemd.services."user@".serviceConfig.Delegate = "cpu cpuset io memory pids";
    systemd.services.corral = {
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ config.environment.etc."corral/policy.toml".source ];
      serviceConfig.ExecStart = [ "" "${cfg.package}/bin/corral run --policy ${cfg.package}/share/corral/default.toml" ];
    };
  };
}
