// The stock socket.io-client, driven by tests/test_socketio.py.
//
//   node sio_client.mjs URL
//
// env SIO_AUTH     JSON object passed as the `auth` option (optional)
// env SIO_OPTIONS  JSON object merged into the io() options (optional);
//                  {"transports": "default"} leaves io()'s own default transports
//
// Prints one JSON line per thing that happens:
//   {"type":"open","transport":"polling"|"websocket"}   (the Engine.IO connection opened)
//   {"type":"connect","recovered":bool,"id":"...","transport":"polling"|"websocket"}
//   {"type":"upgrade","transport":"websocket"}
//   {"type":"event","name":"...","job":{...},"offset":"..."|null,"args":[...]}
//   {"type":"disconnect","reason":"..."}
//   {"type":"connect_error","message":"...","data":...}
// A "cut" line closes the Engine.IO connection under the client (as a network drop
// would: it reconnects and recovers); a "quit" line (or the end of stdin) exits.

import readline from "node:readline";
import { io } from "socket.io-client";

const url = process.argv[2] || process.env.SIO_URL;
if (!url) {
  process.stderr.write("usage: node sio_client.mjs URL\n");
  process.exit(2);
}

const options = { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 500 };
if (process.env.SIO_AUTH) options.auth = JSON.parse(process.env.SIO_AUTH);
if (process.env.SIO_OPTIONS) Object.assign(options, JSON.parse(process.env.SIO_OPTIONS));
if (options.transports === "default") delete options.transports;

const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const socket = io(url, options);

// The upgrade may finish before the Socket.IO CONNECT is answered, so it is watched from
// the moment the engine opens, not from "connect".
socket.io.on("open", () => {
  const engine = socket.io.engine;
  print({ type: "open", transport: engine.transport.name });
  engine.once("upgrade", (transport) => print({ type: "upgrade", transport: transport.name }));
});
socket.on("connect", () => {
  print({ type: "connect", recovered: socket.recovered, id: socket.id,
          transport: socket.io.engine.transport.name });
});
socket.on("disconnect", (reason) => {
  print({ type: "disconnect", reason });
});
socket.on("connect_error", (err) => {
  print({ type: "connect_error", message: err.message, data: err.data ?? null });
});
// Listeners see the recovery offset as a trailing string argument (the client records it
// as its last offset after calling them).
socket.onAny((name, ...args) => {
  const last = args[args.length - 1];
  const offset = args.length > 1 && typeof last === "string" ? last : null;
  print({ type: "event", name, job: args[0] ?? null, offset, args });
});

const quit = () => {
  socket.disconnect();
  process.exit(0);
};
const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (line.trim() === "quit") quit();
  if (line.trim() === "cut") socket.io.engine.close();
});
input.on("close", quit);
