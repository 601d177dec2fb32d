# Helpers shared by the virtufin NixOS modules.
{lib}: rec {
  # RFC 42 settings -> the unit's Environment=: null leaves a variable unset,
  # booleans become true/false, numbers their decimal text.
  toEnvironment = settings:
    lib.mapAttrs (_: value:
      if lib.isBool value
      then lib.boolToString value
      else toString value)
    (lib.filterAttrs (_: value: value != null) settings);

  # IP literals as the services parse VIRTUFIN_GRPC_HOST (Rust's IpAddr):
  # they bind an address and resolve no host names. The IPv6 test is
  # approximate (the service's own parser has the last word at start).
  isIPv4 = address: let
    octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  in
    builtins.match "${octet}[.]${octet}[.]${octet}[.]${octet}" address != null;
  isIPv6 = address:
    builtins.match "[0-9A-Fa-f:.]+" address
    != null
    && lib.hasInfix ":" address
    && !(lib.hasInfix ":::" address)
    && builtins.length (lib.splitString "::" address) <= 2;
  isIP = address: isIPv4 address || isIPv6 address;
  isLoopback = address: lib.hasPrefix "127." address || address == "::1";

  # Where a client on this host reaches a listener on `address`: the
  # loopback of the same family for an "any" address.
  localAddress = address:
    if address == "0.0.0.0"
    then "127.0.0.1"
    else if address == "::"
    then "::1"
    else address;

  # The host part of a URL: IPv6 literals in brackets. The api client
  # (VIRTUFIN_API_HOST) and ASPNETCORE_URLS need them.
  urlHost = address:
    if lib.hasInfix ":" address && !(lib.hasPrefix "[" address)
    then "[${address}]"
    else address;

  # The ports of an ASPNETCORE_URLS list (null for a URL without one).
  urlPorts = urls:
    map (url: let
      m = builtins.match "[a-z]+://.*:([0-9]+)/?" url;
    in
      if m == null
      then null
      else lib.toInt (builtins.head m))
    (lib.filter (u: u != "") (map lib.trim (lib.splitString ";" (builtins.replaceStrings [","] [";"] urls))));

  # The service's two socket units (shipped by the package beside the
  # service, FileDescriptorName=http / grpc): the drop-in NixOS writes
  # replaces their ListenStream= (the empty one resets the packaged
  # address) with the module's address and ports, and wantedBy enables
  # them (NixOS ignores [Install]).
  socketUnits = unit: svc: {
    "${unit}-http" = {
      wantedBy = ["sockets.target"];
      listenStreams = ["" "${urlHost svc.listenAddress}:${toString svc.httpPort}"];
    };
    "${unit}-grpc" = {
      wantedBy = ["sockets.target"];
      listenStreams = ["" "${urlHost svc.listenAddress}:${toString svc.grpcPort}"];
    };
  };

  show = value:
    if value == null
    then "null"
    else if builtins.isString value
    then ''"${value}"''
    else toString value;

  # Assertions that `settings` do not contradict the options the module
  # derives them from. The options are the single source of a port or
  # address: the firewall, the other services and daprd follow them, which
  # they could not do for a value set only in `settings`.
  # `managed`: [{ name; option; value; ok ? v: v == value (as text) }].
  settingsAssertions = prefix: settings: managed:
    map (m: let
      found = settings.${m.name} or null;
      ok = m.ok or (v: v != null && toString v == toString m.value);
    in {
      assertion = ok found;
      message = ''
        ${prefix}.settings.${m.name} = ${show found} contradicts ${m.option} = ${show m.value}.
        The module derives ${m.name} from ${m.option}, and so does everything
        that follows it (the firewall, the services that connect to it, daprd).
        Set ${m.option} instead and remove the setting.
      '';
    })
    managed;

  # Files holding secrets must stay out of the world-readable Nix store
  # (a Nix path literal in a flake already is in it).
  notInStore = option: path: {
    assertion = path == null || !(lib.hasPrefix "${builtins.storeDir}/" (toString path));
    message = ''
      ${option} = "${toString path}" is in the Nix store, which every user
      can read: keep the secret in a file outside it (e.g. /run/secrets/...,
      written by sops-nix or agenix) and give that path as a string.
    '';
  };

  # The assertions and warnings every service module makes about its own
  # options (`prefix`: services.virtufin.<name>).
  serviceChecks = prefix: unit: svc: {
    assertions =
      [
        {
          assertion = isIP svc.listenAddress;
          message = ''
            ${prefix}.listenAddress = "${svc.listenAddress}" is not an IP address.
            ${unit} binds an address and resolves no host names
            (VIRTUFIN_GRPC_HOST): give an IPv4 or IPv6 literal without brackets,
            e.g. "0.0.0.0", "::", "192.0.2.10" or "::1".
          '';
        }
        (notInStore "${prefix}.environmentFile" svc.environmentFile)
      ]
      ++ lib.mapAttrsToList (name: path: notInStore "${prefix}.credentials.${name}" path) svc.credentials
      ++ settingsAssertions prefix svc.settings [
        {
          name = "VIRTUFIN_GRPC_HOST";
          option = "${prefix}.listenAddress";
          value = svc.listenAddress;
        }
        {
          name = "VIRTUFIN_GRPC_PORT";
          option = "${prefix}.grpcPort";
          value = svc.grpcPort;
        }
        {
          name = "VIRTUFIN_HTTP_PORT";
          option = "${prefix}.httpPort";
          value = svc.httpPort;
          ok = v: v == null || toString v == toString svc.httpPort;
        }
        {
          # Other listen URLs are fine (several addresses, say), on this port.
          name = "ASPNETCORE_URLS";
          option = "${prefix}.httpPort";
          value = svc.httpPort;
          ok = v: v != null && lib.all (p: p == svc.httpPort) (urlPorts (toString v));
        }
      ];
    warnings = lib.optional (svc.openFirewall && isLoopback svc.listenAddress) ''
      ${prefix}.openFirewall opens ports ${toString svc.httpPort} and ${toString svc.grpcPort},
      but ${unit} listens on ${svc.listenAddress} only (${prefix}.listenAddress),
      which no other host can reach.
    '';
  };

  # The checks of a service that connects to the api (the websocketmanager
  # and the workmanager). `apiRuns`: whether the api runs on this host.
  apiClientChecks = prefix: unit: svc: apiRuns: let
    host = toString (svc.settings.VIRTUFIN_API_HOST or "");
  in {
    assertions = [
      {
        assertion = !(lib.hasInfix ":" host) || lib.hasPrefix "[" host;
        message = ''
          ${prefix}.settings.VIRTUFIN_API_HOST = "${host}" is an IPv6 address
          without brackets: ${unit} connects to http://HOST:PORT, so write "[${host}]".
        '';
      }
    ];
    warnings = lib.optional (!apiRuns && (host == "" || isLoopback (lib.removePrefix "[" (lib.removeSuffix "]" host)))) ''
      ${unit} connects to the api at ${host}:${toString (svc.settings.VIRTUFIN_API_GRPC_PORT or "")},
      but virtufin-api does not run on this host. Set
      ${prefix}.settings.VIRTUFIN_API_HOST (and VIRTUFIN_API_GRPC_PORT) to where it runs.
    '';
  };
}
