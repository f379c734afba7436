// The agentOS quickstart over one connection: connect, subscribe, act, compare with the log.
import { compare, encodingFromArgs, makeClient, runMain, sessionLog } from "./common.mjs";

const PROMPT = [
	"hello there",
	"think: planning the work",
	"chunks: 5",
	"run: echo from-the-vm",
	"write notes/quick.txt: quickstart bytes",
].join("\n");

await runMain(async () => {
	const encoding = encodingFromArgs();
	const key = process.env.ACTORVISOR_KEY ?? `quickstart-${encoding}-${process.pid}`;
	const client = makeClient(encoding);
	try {
		const conn = client.vm.getOrCreate(key).connect();
		const received = [];
		conn.on("sessionEvent", (ev) => received.push(ev));
		const { sessionId } = await conn.createSession("local");
		const reply = await conn.sendPrompt(sessionId, PROMPT);
		const logged = await sessionLog(conn, sessionId);
		const bytes = await conn.readFile("/workspace/notes/quick.txt");
		await conn.dispose();
		return {
			encoding,
			reply,
			comparison: compare(received, logged),
			received,
			logged,
			file: {
				isUint8Array: bytes instanceof Uint8Array,
				text: new TextDecoder().decode(bytes),
				length: bytes.length,
			},
		};
	} finally {
		await client.dispose();
	}
});
