# NixOS VM test of the chain, for one backend ("valkey" or "dapr"): the same
# proofs as checks/chain/run.sh (the Debian package under systemd-nspawn),
# here with the NixOS modules. The script is chain.py.
{
  self,
  backend,
}: {
  name = "virtufin-chain-${backend}";

  nodes.machine = {pkgs, ...}: let
    python = pkgs.python3.withPackages (ps: [ps.websockets]);
    # A WebSocket echo peer (the Python websockets library).
    wsEcho = pkgs.writeText "ws-echo.py" ''
      import asyncio

      import websockets


      async def echo(ws):
          async for message in ws:
              await ws.send(message)


      async def main():
          async with websockets.serve(echo, "127.0.0.1", 9100):
              await asyncio.Future()


      asyncio.run(main())
    '';
  in {
    imports = [self.nixosModules.default];

    services.virtufin = {
      enable = true;
      inherit backend;
    };

    virtualisation.memorySize = 2048;
    virtualisation.cores = 2;

    # The seed's smoke check addresses the api as virtufin-api:5002.
    networking.extraHosts = "127.0.0.1 virtufin-api";

    environment.systemPackages = [
      pkgs.grpcurl
      pkgs.curl
      pkgs.jq
    ];

    # A Python worker: answers each event on chain-answers.
    environment.etc."virtufin-test/echo.py".text = ''
      def Process(event):
          return {"type": "chain-answers", "data": event["data"]}
    '';

    systemd.services.ws-echo = {
      description = "WebSocket echo peer for the chain test";
      wantedBy = ["multi-user.target"];
      serviceConfig.ExecStart = "${python}/bin/python3 ${wsEcho}";
    };
  };

  testScript =
    ''
      BACKEND = "${backend}"
    ''
    + builtins.readFile ./chain.py;
}
