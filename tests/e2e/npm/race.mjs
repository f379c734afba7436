// The agentOS quickstart race: connect() and subscribe, then act over the stateless
// HTTP handle right away, without waiting for the connection to open. The actor is warm
// (woken by an earlier client), so the turn's first events are emitted before the
// connection's subscription reaches the supervisor. Every event of the turn must still
// arrive on the connection (the supervisor's implicit cursor); a repeat is counted.
import { encodingFromArgs, makeClient, runMain, sessionLog, settle } from "./common.mjs";

const PROMPT = "hello there\nchunks: 8\nrun: echo raced\nwrite race.txt: raced bytes";

await runMain(async () => {
	const encoding = encodingFromArgs();
	const key = process.env.ACTORVISOR_KEY ?? `race-${encoding}-${process.pid}`;
	const warmer = makeClient(encoding);
	await warmer.vm.getOrCreate(key).getRuntimeHealth();
	await warmer.dispose();
	const client = makeClient(encoding);
	try {
		const handle = client.vm.getOrCreate(key);
		const conn = handle.connect();
		const received = [];
		conn.on("sessionEvent", (ev) => received.push(ev));
		const { sessionId } = await handle.createSession("local");
		const reply = await handle.sendPrompt(sessionId, PROMPT);
		const logged = await sessionLog(handle, sessionId);
		const comparison = await settle(conn, received, sessionId, logged);
		await conn.dispose();
		return { encoding, reply, comparison, received, logged };
	} finally {
		await client.dispose();
	}
});
