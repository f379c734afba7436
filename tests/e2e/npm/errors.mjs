// Errors reach the npm client as ActorError with group and code, over a connection and
// over the stateless HTTP handle; an error never spoils the connection it came on.
import { ActorError } from "rivetkit/client";
import { encodingFromArgs, errorInfo, makeClient, runMain } from "./common.mjs";

const NO_ANSWER_MS = 10_000;

async function outcome(promise) {
	let timer;
	const timeout = new Promise((_, reject) => {
		timer = setTimeout(() => reject(new Error(`no answer within ${NO_ANSWER_MS} ms`)), NO_ANSWER_MS);
	});
	try {
		return { ok: true, value: await Promise.race([promise, timeout]) };
	} catch (err) {
		return { ok: false, isActorError: err instanceof ActorError, ...errorInfo(err) };
	} finally {
		clearTimeout(timer);
	}
}

/** A connection to an actor id that does not exist: what its action and onError see. */
async function missingActorConnection(client, actorId) {
	const conn = client.vm.getForId(actorId).connect();
	const onError = [];
	conn.onError((err) => onError.push({ isActorError: err instanceof ActorError, ...errorInfo(err) }));
	const action = await outcome(conn.getRuntimeHealth());
	const status = conn.connStatus;
	await conn.dispose();
	return { action, onError, status };
}

await runMain(async () => {
	const encoding = encodingFromArgs();
	const tag = `${encoding}-${process.pid}`;
	const client = makeClient(encoding);
	try {
		const handle = client.vm.getOrCreate(`errors-${tag}`);
		const conn = handle.connect();
		const results = {
			connUnknownAction: await outcome(conn.noSuchAction(1)),
			connInvalidArgs: await outcome(conn.createSession(42)),
			connMissingSession: await outcome(conn.sendPrompt("no-such-session", "hi")),
			connStillWorks: await outcome(conn.listSessions()),
			httpUnknownAction: await outcome(handle.noSuchAction(1)),
			httpInvalidArgs: await outcome(handle.createSession(42)),
			httpMissingSession: await outcome(handle.sendPrompt("no-such-session", "hi")),
			httpMissingActorKey: await outcome(client.vm.get(`missing-${tag}`).getRuntimeHealth()),
			httpMissingActorId: await outcome(client.vm.getForId(`missing-${tag}`).getRuntimeHealth()),
			connMissingActorId: await missingActorConnection(client, `missing-${tag}`),
			httpUnknownKind: await outcome(client.chatRoom.getOrCreate(`k-${tag}`).getRuntimeHealth()),
			connUnknownKind: await outcome(client.chatRoom.getOrCreate(`k-${tag}`).connect().getRuntimeHealth()),
		};
		results.connStillConnected = conn.connStatus;
		await conn.dispose();
		return { encoding, results };
	} finally {
		await client.dispose();
	}
});
