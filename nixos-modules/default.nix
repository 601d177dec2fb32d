# services.virtufin: the whole stack (Valkey, optionally daprd, the api,
# the websocketmanager and the workmanager). Each service module can also
# be imported alone (the flake's nixosModules.{api,websocketmanager,workmanager}).
{
  imports = [
    ./api.nix
    ./websocketmanager.nix
    ./workmanager.nix
  ];
}
