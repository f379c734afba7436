// Two subscribers of the unmodified client on one actor while the driver (pytest) kills
// its worker in the middle of bursts: one plain (`conn.on`, no cursor) and one that
// resumes by cursor as an npm app can (its first act: `replayEvents({after})` from its
// cursor, merged with the live stream by seq). After "ready" the driver runs its rounds,
// then says "done"; the result lists the seqs each one received live, in arrival order.
import { createInterface } from "node:readline";
import { emit, encodingFromArgs, makeClient, runMain } from "./common.mjs";

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

await runMain(async () => {
	const encoding = encodingFromArgs();
	const key = process.env.ACTORVISOR_KEY;
	const cursor = Number(process.env.ACTORVISOR_CURSOR ?? "0");
	const client = makeClient(encoding);
	try {
		const handle = client.vm.getOrCreate(key);
		const plain = handle.connect();
		const plainSeqs = [];
		plain.on("sessionEvent", (ev) => plainSeqs.push(ev.seq));
		const resuming = handle.connect();
		const liveSeqs = [];
		const merged = new Set();
		resuming.on("sessionEvent", (ev) => {
			liveSeqs.push(ev.seq);
			merged.add(ev.seq);
		});
		await plain.getRuntimeHealth();
		await resuming.getRuntimeHealth();
		let after = cursor;
		for (;;) {
			const page = await handle.replayEvents({ after, names: ["sessionEvent"] });
			for (const e of page.events) merged.add(e.seq);
			after = page.nextCursor;
			if (!page.hasMore) break;
		}
		emit({ phase: "ready" });
		const { value } = await lines.next();
		if (value?.trim() !== "done") throw new Error(`unexpected command ${value}`);
		// Replies come behind the events relayed before them: a barrier on each connection.
		await plain.getRuntimeHealth();
		await resuming.getRuntimeHealth();
		await plain.dispose();
		await resuming.dispose();
		return { phase: "done", plain: plainSeqs, cursorLive: liveSeqs, cursorMerged: [...merged].sort((a, b) => a - b) };
	} finally {
		await client.dispose();
	}
});
