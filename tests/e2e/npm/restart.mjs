// Graceful restart: a connection stays open while the supervisor is stopped (SIGTERM)
// and started again on the same port and state dir. The driver (pytest) restarts it
// after our "ready" line and says "restarted" on stdin; the same `conn` should reconnect
// by itself and receive the next turn's events. The result says how the connection
// fared: "reconnected", "abandoned" (the client stopped retrying: status idle) or
// "timeout".
import { createInterface } from "node:readline";
import { compare, emit, encodingFromArgs, errorInfo, makeClient, runMain, sessionLog } from "./common.mjs";

const RECONNECT_WAIT_MS = 20_000;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function nextLine(what) {
	const { value, done } = await lines.next();
	if (done) throw new Error(`stdin closed while waiting for ${what}`);
	return value.trim();
}

function reconnection(conn) {
	return new Promise((resolve) => {
		let off = () => {};
		const finish = (outcome) => {
			off();
			clearTimeout(timer);
			resolve(outcome);
		};
		const check = () => {
			if (conn.connStatus === "connected") finish("reconnected");
			else if (conn.connStatus === "idle") finish("abandoned");
		};
		const timer = setTimeout(() => finish("timeout"), RECONNECT_WAIT_MS);
		off = conn.onStatusChange(check);
		check();
	});
}

await runMain(async () => {
	const encoding = encodingFromArgs();
	const key = process.env.ACTORVISOR_KEY ?? `restart-${encoding}-${process.pid}`;
	const client = makeClient(encoding);
	try {
		const conn = client.vm.getOrCreate(key).connect();
		const statuses = [];
		const errors = [];
		conn.onStatusChange((status) => statuses.push(status));
		conn.onError((err) => errors.push(errorInfo(err)));
		const received = [];
		conn.on("sessionEvent", (ev) => received.push(ev));
		const { sessionId } = await conn.createSession("local");
		await conn.sendPrompt(sessionId, "before the restart\nchunks: 3");
		const connIdBefore = conn.connId;
		const receivedBefore = received.length;
		emit({ phase: "ready", sessionId, received: receivedBefore });

		const command = await nextLine("the restart");
		if (command !== "restarted") throw new Error(`unexpected command ${command}`);
		const outcome = await reconnection(conn);
		const result = { phase: "done", encoding, outcome, statuses: [...statuses], errors, receivedBefore };
		if (outcome === "reconnected") {
			result.reconnectedConnId = conn.connId !== connIdBefore;
			result.reply = await conn.sendPrompt(sessionId, "after the restart\nchunks: 3\nrun: echo back");
			// The reply came on this connection behind the turn's events.
			result.comparison = compare(received, await sessionLog(conn, sessionId));
		}
		await conn.dispose();
		return result;
	} finally {
		await client.dispose();
	}
});
