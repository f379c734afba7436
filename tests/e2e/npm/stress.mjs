// Back-to-back agentOS quickstart cycles in one process, all on one key (a warm actor,
// where actions are fastest and so race the subscription hardest). Each cycle: a new
// client and a new connection, `conn.on("sessionEvent")`, then createSession and
// sendPrompt over the HTTP handle right away, then compare what the connection received
// for that session with `getSessionEvents`.
import { encodingFromArgs, makeClient, runMain, sessionLog, settle } from "./common.mjs";

const PROMPT = "hello stress\nchunks: 4\nwrite stress.txt: cycle";
// A failing run should fail fast and say how, not wait out every cycle.
const LATE_WAIT_MS = 1_000;
const STOP_AFTER_BAD_CYCLES = 10;

async function cycle(encoding, key) {
	const client = makeClient(encoding);
	try {
		const handle = client.vm.getOrCreate(key);
		const conn = handle.connect();
		const events = [];
		conn.on("sessionEvent", (ev) => events.push(ev));
		const { sessionId } = await handle.createSession("local");
		await handle.sendPrompt(sessionId, PROMPT);
		const logged = await sessionLog(handle, sessionId);
		const final = await settle(conn, events, sessionId, logged, LATE_WAIT_MS);
		await conn.dispose();
		return final;
	} finally {
		await client.dispose();
	}
}

await runMain(async () => {
	const encoding = encodingFromArgs();
	const cycles = Number(process.argv[3] ?? 300);
	const key = process.env.ACTORVISOR_KEY ?? `stress-${encoding}-${process.pid}`;
	const totals = { logged: 0, received: 0, missing: 0, duplicated: 0, unexpected: 0, mismatched: 0,
		outOfOrder: 0, lateAtBarrier: 0, foreign: 0 };
	const badCycles = [];
	const started = performance.now();
	let completed = 0;
	for (let i = 0; i < cycles && badCycles.length < STOP_AFTER_BAD_CYCLES; i++) {
		const final = await cycle(encoding, key);
		totals.logged += final.logged;
		totals.received += final.received;
		totals.missing += final.missing.length;
		totals.duplicated += final.duplicated;
		totals.unexpected += final.unexpected;
		totals.mismatched += final.mismatched;
		totals.outOfOrder += final.inOrder ? 0 : 1;
		totals.lateAtBarrier += final.lateAtBarrier;
		totals.foreign += final.foreign;
		if (final.missing.length || final.duplicated || final.unexpected || final.mismatched || !final.inOrder) {
			badCycles.push({ cycle: i, ...final });
		}
		completed += 1;
	}
	return { encoding, key, cycles, completed, ...totals, elapsedMs: Math.round(performance.now() - started), badCycles };
});
