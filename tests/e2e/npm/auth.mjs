// The npm client with or without `token` (ACTORVISOR_TOKEN) against a service that wants
// one: what a connection's action and a stateless HTTP action see, for key argv[3].
import { ActorError, createClient } from "rivetkit/client";
import { encodingFromArgs, errorInfo, runMain } from "./common.mjs";

async function outcome(promise) {
	let timer;
	const timeout = new Promise((_, reject) => {
		timer = setTimeout(() => reject(new Error("no answer within 15000 ms")), 15_000);
	});
	try {
		await Promise.race([promise, timeout]);
		return { ok: true };
	} catch (err) {
		return { ok: false, isActorError: err instanceof ActorError, ...errorInfo(err) };
	} finally {
		clearTimeout(timer);
	}
}

await runMain(async () => {
	const encoding = encodingFromArgs();
	const key = process.argv[3];
	const token = process.env.ACTORVISOR_TOKEN || undefined;
	const client = createClient({ endpoint: process.env.ACTORVISOR_URL, encoding, token });
	try {
		const handle = client.vm.getOrCreate(key);
		const http = await outcome(handle.getRuntimeHealth());
		const conn = handle.connect();
		const connected = await outcome(conn.getRuntimeHealth());
		await conn.dispose();
		return { encoding, http, connected };
	} finally {
		await client.dispose();
	}
});
