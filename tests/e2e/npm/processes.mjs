// Spawned processes with the unmodified client: every output line exactly once, in order,
// then processExit. With "reconnect", the connection is dropped in the middle of the
// output and a new one resumes by cursor: `replayEvents({after})` from the last seq seen,
// merged with the live stream by seq.
import { encodingFromArgs, makeClient, runMain } from "./common.mjs";

const LINES = 20000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

await runMain(async () => {
	const encoding = encodingFromArgs();
	const reconnect = process.argv[3] === "reconnect";
	const client = makeClient(encoding);
	const handle = client.vm.getOrCreate(`procs-${encoding}-${process.pid}`);
	const bySeq = new Map();
	let exit = null;
	let repeats = 0;
	const take = (e) => {
		if (bySeq.has(e.seq)) repeats += 1;
		bySeq.set(e.seq, e);
	};
	const listen = (conn) => {
		conn.on("processOutput", take);
		conn.on("processExit", (e) => {
			take({ ...e, exit: true });
			exit = e;
		});
	};
	let conn = handle.connect();
	listen(conn);
	// Slow enough (about 2 s) that the reconnect lands in the middle of the output.
	const script = reconnect
		? `for i in $(seq 1 ${LINES}); do echo $i; [ $((i % 1000)) -eq 0 ] && sleep 0.1; done; true`
		: `for i in $(seq 1 ${LINES}); do echo $i; done`;
	const { pid } = await conn.spawn("sh", ["-c", script]);
	let resumedAfter = null;
	if (reconnect) {
		while (bySeq.size < 5) await sleep(5);
		await conn.dispose();
		await sleep(300);
		resumedAfter = Math.max(...bySeq.keys());
		conn = handle.connect();
		listen(conn);
		await conn.getRuntimeHealth();
		let after = resumedAfter;
		for (;;) {
			const page = await handle.replayEvents({ after, names: ["processOutput", "processExit"] });
			for (const e of page.events) {
				if (!bySeq.has(e.seq)) take(e.name === "processExit" ? { ...e.args[0], exit: true } : e.args[0]);
			}
			after = page.nextCursor;
			if (!page.hasMore) break;
		}
	}
	const deadline = Date.now() + 60_000;
	while (!exit && Date.now() < deadline) await sleep(20);
	const waited = await conn.waitProcess(pid);
	const events = [...bySeq.values()].filter((e) => e.pid === pid).sort((a, b) => a.seq - b.seq);
	const chunks = events.filter((e) => !e.exit);
	const bytes = Buffer.concat(chunks.map((e) => Buffer.from(e.data)));
	const lines = bytes.toString("utf8").split("\n").filter((l) => l !== "");
	let inOrder = lines.length === LINES;
	for (let i = 0; inOrder && i < LINES; i += 1) inOrder = lines[i] === String(i + 1);
	const dataTypes = [...new Set(chunks.map((e) => Object.prototype.toString.call(e.data)))];
	await conn.dispose();
	return {
		encoding,
		lines: lines.length,
		inOrder,
		chunks: chunks.length,
		exit: exit && { exitCode: exit.exitCode, signal: exit.signal },
		exitLast: events.length > 0 && events[events.length - 1].exit === true,
		waited,
		resumedAfter,
		repeats,
		dataTypes,
	};
});
