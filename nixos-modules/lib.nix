# Helpers shared by the virtufin NixOS modules.
{lib}: {
  # RFC 42 settings -> the unit's Environment=: null leaves a variable unset,
  # booleans become true/false, numbers their decimal text.
  toEnvironment = settings:
    lib.mapAttrs (_: value:
      if lib.isBool value
      then lib.boolToString value
      else toString value)
    (lib.filterAttrs (_: value: value != null) settings);

  # The host part of an http:// URL (IPv6 literals in brackets).
  urlHost = address:
    if lib.hasInfix ":" address
    then "[${address}]"
    else address;

  # Where a client on this host reaches a service listening on `address`.
  localAddress = address:
    if
      lib.elem address [
        "0.0.0.0"
        "::"
        "+"
        "*"
      ]
    then "127.0.0.1"
    else address;
}
