# Reading systemd unit texts (NixOS's rendered ones and the repository's
# own files) without systemd: for checks.nix and debian.nix.
{lib}: rec {
  # [{section, key, value}] of a unit file's text (no line continuations).
  parse = text:
    (lib.foldl' (acc: line: let
      header = builtins.match "[[](.*)[]]" line;
      kv = builtins.match "([A-Za-z0-9_-]+)=(.*)" line;
    in
      if header != null
      then acc // {section = builtins.head header;}
      else if kv != null
      then
        acc
        // {
          entries =
            acc.entries
            ++ [
              {
                inherit (acc) section;
                key = builtins.elemAt kv 0;
                value = builtins.elemAt kv 1;
              }
            ];
        }
      else acc) {
      section = null;
      entries = [];
    } (lib.filter (l: l != "" && !(lib.hasPrefix "#" l)) (lib.splitString "\n" text)))
    .entries;
  values = entries: section: key: map (e: e.value) (lib.filter (e: e.section == section && e.key == key) entries);
  value = entries: section: key: let
    v = values entries section key;
  in
    if v == []
    then null
    else lib.last v;
  words = entries: section: key: lib.concatMap (lib.splitString " ") (values entries section key);
  # Environment="NAME=value" (NixOS writes it JSON-quoted) or
  # Environment=NAME=value, one assignment a line.
  environment = entries:
    lib.listToAttrs (map (v: let
      kv = builtins.match "([^=]*)=(.*)" (
        if lib.hasPrefix "\"" v
        then builtins.fromJSON v
        else v
      );
    in
      lib.nameValuePair (builtins.elemAt kv 0) (builtins.elemAt kv 1)) (values entries "Service" "Environment"));
}
