// Shared by the scripts in this folder: they drive the unmodified npm `rivetkit` client
// against the supervisor at ACTORVISOR_URL and print their result as one JSON line on
// stdout, after RESULT_PREFIX (the client logs its info lines to stdout too).
import { createClient } from "rivetkit/client";

export const ENCODINGS = ["bare", "json", "cbor"];
export const RESULT_PREFIX = "ACTORVISOR_RESULT ";

export function emit(result) {
	process.stdout.write(`${RESULT_PREFIX}${JSON.stringify(result)}\n`);
}

export function encodingFromArgs() {
	const encoding = process.argv[2] ?? process.env.ACTORVISOR_ENCODING ?? "bare";
	if (!ENCODINGS.includes(encoding)) {
		throw new Error(`encoding must be one of ${ENCODINGS.join(", ")}, not ${encoding}`);
	}
	return encoding;
}

export function makeClient(encoding) {
	const endpoint = process.env.ACTORVISOR_URL;
	if (!endpoint) throw new Error("ACTORVISOR_URL is not set");
	return createClient({ endpoint, encoding });
}

/** Page through `getSessionEvents` (an array, as agentOS has) until a page is empty. */
export async function sessionLog(handle, sessionId) {
	const events = [];
	let after = 0;
	for (;;) {
		const page = await handle.getSessionEvents(sessionId, { after });
		if (page.length === 0) return events;
		events.push(...page);
		after = page[page.length - 1].seq;
	}
}

/** Compare what a connection received for one session with the session's log. */
export function compare(received, logged) {
	const loggedBySeq = new Map(logged.map((e) => [e.seq, e]));
	const seen = new Set();
	let duplicated = 0;
	let unexpected = 0;
	let mismatched = 0;
	for (const ev of received) {
		if (seen.has(ev.seq)) {
			duplicated += 1;
			continue;
		}
		seen.add(ev.seq);
		const logEntry = loggedBySeq.get(ev.seq);
		if (!logEntry) unexpected += 1;
		else if (JSON.stringify(logEntry.event) !== JSON.stringify(ev.event)) mismatched += 1;
	}
	const missing = logged.filter((e) => !seen.has(e.seq)).map((e) => e.seq);
	const order = received.map((e) => e.seq);
	const inOrder = order.every((s, i) => i === 0 || s > order[i - 1]);
	return { logged: logged.length, received: received.length, missing, duplicated, unexpected, mismatched, inOrder };
}

/**
 * What a connection received of one session, once it has caught up with the log.
 *
 * Events relayed before an HTTP action's reply are already queued on every subscribed
 * connection, so a reply to an action sent on the connection afterwards arrives behind
 * them: that reply is the barrier. Anything still missing then is waited for a while
 * longer, to tell a late event from a lost one.
 */
export async function settle(conn, received, sessionId, logged, lateWaitMs = 5_000) {
	await conn.getRuntimeHealth();
	const mine = () => received.filter((e) => e.sessionId === sessionId);
	const atBarrier = compare(mine(), logged);
	const deadline = Date.now() + lateWaitMs;
	while (compare(mine(), logged).missing.length > 0 && Date.now() < deadline) {
		await new Promise((resolve) => setTimeout(resolve, 20));
	}
	return {
		...compare(mine(), logged),
		lateAtBarrier: atBarrier.missing.length,
		foreign: received.length - mine().length,
	};
}

export function errorInfo(err) {
	return {
		name: err?.constructor?.name ?? typeof err,
		group: err?.group,
		code: err?.code,
		message: String(err?.message ?? err),
	};
}

/** Run `main` and print its result (or its error) as one line; exit status 1 on error. */
export async function runMain(main) {
	let code = 0;
	try {
		emit(await main());
	} catch (err) {
		emit({ error: errorInfo(err), stack: err?.stack });
		code = 1;
	}
	process.exitCode = code;
}
