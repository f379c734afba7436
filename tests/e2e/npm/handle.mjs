// Stateless HTTP handles: actions without a connection, and the manager API behind
// create() / resolve() / getForId().
import { encodingFromArgs, makeClient, runMain, sessionLog } from "./common.mjs";

const text = (bytes) => new TextDecoder().decode(bytes);

await runMain(async () => {
	const encoding = encodingFromArgs();
	const tag = `${encoding}-${process.pid}`;
	const client = makeClient(encoding);
	try {
		const key = `handle-${tag}`;
		const handle = client.vm.getOrCreate(key);
		const { sessionId } = await handle.createSession("local", { cwd: "/workspace" });
		const reply = await handle.sendPrompt(sessionId, "hello handle\nwrite h.txt: via http");
		const sessions = await handle.listSessions();
		const events = await sessionLog(handle, sessionId);
		const binary = new Uint8Array([0, 1, 2, 253, 254, 255]);
		await handle.writeFile("/workspace/bin.dat", binary);
		const readBack = await handle.readFile("/workspace/bin.dat");
		const written = await handle.readFile("/workspace/h.txt");
		const exec = await handle.exec("printf '%s' \"$GREETING\"", { env: { GREETING: "hi from exec" } });
		const health = await handle.getRuntimeHealth();
		const exists = [await handle.exists("/workspace/h.txt"), await handle.exists("/workspace/nope")];

		// The manager API: resolve() by key, getForId(), create() with a multi-part key.
		const actorId = await handle.resolve();
		const byGet = await client.vm.get(key).resolve();
		const byId = await client.vm.getForId(actorId).listSessions();
		const multiKey = ["team", `agent-${tag}`];
		const created = await client.vm.create(multiKey);
		const createdId = await created.resolve();
		await created.writeFile("/workspace/who.txt", "created");
		const viaQuery = text(await client.vm.getOrCreate(multiKey).readFile("/workspace/who.txt"));
		const viaGet = await client.vm.get(multiKey).resolve();
		const emptyKeyId = await client.vm.getOrCreate().resolve();
		const emptyKeyGet = await client.vm.get([]).resolve();

		return {
			encoding,
			reply,
			sessions: sessions.map((s) => ({ sessionId: s.sessionId, agentType: s.agentType })),
			sessionId,
			eventSeqs: events.map((e) => e.seq),
			files: {
				binary: { isUint8Array: readBack instanceof Uint8Array, bytes: Array.from(readBack) },
				written: text(written),
			},
			exec,
			health: { phase: health.phase, booted: health.booted, pidIsNumber: Number.isInteger(health.pid) },
			exists,
			ids: { actorId, byGet, byIdSessions: byId.length, createdId, viaGet, emptyKeyId, emptyKeyGet },
			viaQuery,
		};
	} finally {
		await client.dispose();
	}
});
