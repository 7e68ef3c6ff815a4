// The stock socket.io-client, driven by tests/test_socketio.py.
//
//   node sio_client.mjs URL
//
// env SIO_AUTH     JSON object passed as the `auth` option (optional)
// env SIO_OPTIONS  JSON object merged into the io() options (optional)
//
// Prints one JSON line per thing that happens:
//   {"type":"connect","recovered":bool,"id":"..."}
//   {"type":"event","name":"...","job":{...},"offset":"..."|null,"args":[...]}
//   {"type":"disconnect","reason":"..."}
//   {"type":"connect_error","message":"...","data":...}
// and exits on a "quit" line (or the end of stdin).

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

const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const socket = io(url, options);

socket.on("connect", () => {
  print({ type: "connect", recovered: socket.recovered, id: socket.id });
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
});
input.on("close", quit);
