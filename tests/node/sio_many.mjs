// Many stock socket.io-client sockets in one process, driven by the routing tests.
//
//   node sio_many.mjs URL COUNT
//
// env SIO_OPTIONS  JSON object passed as io()'s options (optional; none: io(url) as is)
//
// Each socket is its own Manager (io() with forceNew), as COUNT pages would be. Prints
// one JSON line per milestone:
//   {"type":"connected"}   every socket has connected once
//   {"type":"upgraded"}    every socket's engine has upgraded once
//   {"type":"has"}         every socket has the ON_RESOLVED_JOB of every id of a `wait`
//   {"type":"report","clients":[{connects, upgrades, connectErrors, disconnects,
//                               resolved: [ids in order], at: {id: ms when first had},
//                               transport}]}
// Commands on stdin, one a line: `wait ["id",...]`, `report`, `quit`.

import readline from "node:readline";
import { io } from "socket.io-client";

const [url, countText] = process.argv.slice(2);
const count = Number(countText);
const options = process.env.SIO_OPTIONS ? JSON.parse(process.env.SIO_OPTIONS) : {};
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const clients = [];
let waiting = null; // ids every socket must have
const milestones = new Set();
const check = () => {
  if (!milestones.has("connected") && clients.every((c) => c.connects > 0)) {
    milestones.add("connected");
    print({ type: "connected" });
  }
  if (!milestones.has("upgraded") && clients.every((c) => c.upgrades > 0)) {
    milestones.add("upgraded");
    print({ type: "upgraded" });
  }
  if (waiting && clients.every((c) => waiting.every((id) => c.seen.has(id)))) {
    waiting = null;
    print({ type: "has" });
  }
};

for (let n = 0; n < count; n++) {
  const client = { connects: 0, upgrades: 0, connectErrors: [], disconnects: [],
                   resolved: [], seen: new Set(), at: {} };
  const socket = client.socket = io(url, { ...options, forceNew: true });
  socket.io.on("open", () => {
    socket.io.engine.on("upgrade", () => { client.upgrades += 1; check(); });
  });
  socket.on("connect", () => { client.connects += 1; check(); });
  socket.on("connect_error", (err) => client.connectErrors.push(err.message));
  socket.on("disconnect", (reason) => client.disconnects.push(reason));
  socket.on("ON_RESOLVED_JOB", (job) => {
    client.resolved.push(job.id);
    client.seen.add(job.id);
    client.at[job.id] ??= Date.now();
    check();
  });
  clients.push(client);
}

const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  const [command, ...rest] = line.trim().split(" ");
  if (command === "wait") {
    waiting = JSON.parse(rest.join(" "));
    check();
  } else if (command === "report") {
    print({ type: "report", clients: clients.map((c) => ({
      connects: c.connects, upgrades: c.upgrades, connectErrors: c.connectErrors,
      disconnects: c.disconnects, resolved: c.resolved, at: c.at,
      transport: c.socket.io.engine?.transport.name ?? null,
    })) });
  } else if (command === "quit") {
    for (const c of clients) c.socket.disconnect();
    process.exit(0);
  }
});
input.on("close", () => process.exit(0));
