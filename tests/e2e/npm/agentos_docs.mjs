// agentOS's documentation examples (rivet-dev/agentos examples/docs/ and
// examples/agentos-typecheck) that use only sessions, history, permissions, filesystem and
// cron, as a user would run them against this service with the plain npm `rivetkit`
// client: the same calls with the same arguments, in order. What changes: the client is
// `createClient({endpoint})`, agent "pi" is "local", and where an example reads back what
// the agent did, its prompt is said in the local agent's prompt language
// (docs/local-agent.md). The approval examples keep agent "claude" and run against the
// fake Anthropic API the test starts. One node process runs them all, in sequence; each
// one's outcome (what the example would print) is a field of the result line.
import { emit, errorInfo, makeClient } from "./common.mjs";

const log = [];
const say = (...parts) => log.push(parts.map((p) => (typeof p === "string" ? p : JSON.stringify(p))).join(" "));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const text = (bytes) => new TextDecoder().decode(bytes);
const key = (name) => `${name}-${process.pid}`;
const apiKey = () => ({ ANTHROPIC_API_KEY: process.env.ANTHROPIC_API_KEY });

async function waitFor(check, what, ms = 20_000) {
	const deadline = Date.now() + ms;
	for (;;) {
		const value = check();
		if (value) return value;
		if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
		await sleep(25);
	}
}

const client = makeClient(process.env.ACTORVISOR_ENCODING ?? "json");

// ---- examples/docs/quickstart/client.ts and crash-course/minimal-client.ts -------------
async function quickstart() {
	const handle = client.vm.getOrCreate(key("quickstart"));
	const conn = handle.connect();
	const streamed = [];
	conn.on("sessionEvent", (data) => streamed.push(data.event));
	const session = await handle.createSession("local", { env: apiKey() });
	const response = await handle.sendPrompt(session.sessionId,
		"write /workspace/hello.js: console.log('hello world')");
	const content = await handle.readFile("/workspace/hello.js");
	await conn.dispose();
	return { text: response.text, stopReason: response.stopReason, hasResponse: "response" in response,
		file: text(content), streamedMethods: [...new Set(streamed.map((e) => e.method))] };
}

// ---- examples/docs/sessions/client.ts --------------------------------------------------
async function sessions() {
	const agent = client.vm.getOrCreate(key("sessions"));
	const out = {};
	const created = await agent.createSession("local", { env: apiKey() });
	out.created = { sessionId: typeof created.sessionId, capabilities: created.capabilities, agentInfo: created.agentInfo };
	await agent.mkdir("/home/agentos/project", { recursive: true });
	out.withCwd = typeof (await agent.createSession("local", { env: apiKey(), cwd: "/home/agentos/project" })).sessionId;
	out.withLocalMcp = typeof (await agent.createSession("local", { env: apiKey(), mcpServers: [
		{ type: "local", command: "npx", args: ["-y", "@modelcontextprotocol/server-filesystem", "/home/agentos"], env: {} }] })).sessionId;
	out.withRemoteMcp = typeof (await agent.createSession("local", { env: apiKey(), mcpServers: [
		{ type: "remote", url: "https://mcp.example.com/sse", headers: { Authorization: "Bearer my-token" } }] })).sessionId;
	out.withInstructions = typeof (await agent.createSession("local", { env: apiKey(),
		additionalInstructions: "Always write tests before implementation." })).sessionId;
	out.withSkipOsInstructions = typeof (await agent.createSession("local", { env: apiKey(), skipOsInstructions: true })).sessionId;

	const prompted = await agent.createSession("local", { env: apiKey() });
	out.sendPrompt = (await agent.sendPrompt(prompted.sessionId, "Create a TypeScript function that checks if a number is prime")).text;

	// Streaming, client events, subscribe-first: one connection, subscribed before acting.
	const conn = agent.connect();
	const streamed = [];
	conn.on("sessionEvent", (data) => streamed.push([data.sessionId, data.event.method]));
	conn.on("vmBooted", () => say("VM is ready"));
	conn.on("vmShutdown", (data) => say("VM shutting down:", data.reason));
	const streaming = await agent.createSession("local", { env: apiKey() });
	await agent.sendPrompt(streaming.sessionId, "Explain how async/await works");
	await waitFor(() => streamed.some(([sid]) => sid === streaming.sessionId), "streamed session events");
	out.streamed = streamed.filter(([sid]) => sid === streaming.sessionId).map(([, method]) => method);

	// Cancel a prompt (the example waits 10 s; a sleeping local turn is cancelled sooner).
	const long = await agent.createSession("local", { env: apiKey() });
	const pending = agent.sendPrompt(long.sessionId, "sleep: 30");
	setTimeout(async () => { await agent.cancelPrompt(long.sessionId); }, 300);
	out.cancelled = (await pending).stopReason;

	// Close and destroy.
	const doomed = await agent.createSession("local", { env: apiKey() });
	await agent.closeSession(doomed.sessionId);
	out.destroyed = await agent.destroySession(doomed.sessionId);

	// Replay events.
	const replayed = await agent.createSession("local", { env: apiKey() });
	await agent.sendPrompt(replayed.sessionId, "Hello");
	const events = await agent.getSessionEvents(replayed.sessionId);
	const sequenced = await agent.getSequencedEvents(replayed.sessionId, { since: 0 });
	out.events = events.map((e) => Object.keys(e).sort().join(","));
	out.sequenced = sequenced.map((e) => Object.keys(e).sort().join(","));
	out.sameNotifications = JSON.stringify(events.map((e) => e.event)) === JSON.stringify(sequenced.map((e) => e.notification));

	// Persisted session history.
	const persisted = await agent.listPersistedSessions();
	for (const s of persisted) say(s.sessionId, s.agentType, s.createdAt);
	const history = await agent.getSessionEvents(persisted[0].sessionId);
	for (const e of history) say(e.seq, e.event.method, e.createdAt);
	out.persisted = { count: persisted.length, agentTypes: [...new Set(persisted.map((s) => s.agentType))],
		createdAt: persisted.every((s) => typeof s.createdAt === "number"),
		destroyedListed: persisted.some((s) => s.sessionId === doomed.sessionId) };

	// Multiple sessions in one VM.
	const coder = await agent.createSession("local", { env: apiKey() });
	const reviewer = await agent.createSession("local", { env: apiKey() });
	await agent.sendPrompt(coder.sessionId, "write /home/agentos/api.ts: export const api = 1;");
	out.reviewer = (await agent.sendPrompt(reviewer.sessionId, "run: cat /home/agentos/api.ts")).text;
	await agent.closeSession(coder.sessionId);
	await agent.closeSession(reviewer.sessionId);
	await conn.dispose();
	return out;
}

// ---- examples/docs/core/client.ts (filesystem, agent sessions, cron) -------------------
async function core() {
	const handle = client.vm.getOrCreate(key("core"));
	const out = {};
	out.exec = (await handle.exec("echo hello")).stdout;
	await handle.writeFile("/home/user/hello.txt", "Hello, world!");
	out.readFile = text(await handle.readFile("/home/user/hello.txt"));
	await handle.mkdir("/home/user/src");
	out.writeFiles = await handle.writeFiles([
		{ path: "/home/user/src/index.ts", content: "console.log('hi');" },
		{ path: "/home/user/src/utils.ts", content: "export const add = (a: number, b: number) => a + b;" },
	]);
	const entries = await handle.readdirRecursive("/home/user");
	for (const entry of entries) say(entry.type, entry.path);
	out.tree = entries.map((e) => `${e.type} ${e.path}`);

	const conn = handle.connect();
	const methods = [];
	conn.on("sessionEvent", (data) => methods.push(data.event.method));
	conn.on("permissionRequest", (data) => {
		void handle.respondPermission(data.sessionId, data.request.permissionId, "once");
	});
	const session = await handle.createSession("local", { env: apiKey() });
	out.prompt = (await handle.sendPrompt(session.sessionId, "Write a hello world script")).text;
	await handle.setModel(session.sessionId, "claude-sonnet-4-6");
	await handle.setMode(session.sessionId, "plan");
	await handle.closeSession(session.sessionId);

	// Cron jobs.
	const { id } = await handle.scheduleCron({
		id: "cleanup", schedule: "0 * * * *", action: { type: "exec", command: "rm", args: ["-rf", "/tmp/cache"] } });
	out.scheduled = id;
	await handle.scheduleCron({ schedule: "0 9 * * *", action: {
		type: "session", agentType: "local", prompt: "Review the logs and summarize any errors", options: { cwd: "/workspace" } } });
	const cronEvents = [];
	conn.on("cronEvent", (data) => { say("Cron event:", data.event.id, data.event.schedule); cronEvents.push(data); });
	out.listCronJobs = await handle.listCronJobs();
	// Not in the example: a job due now, to see its events arrive on that subscription.
	await handle.scheduleCron({ id: "now", schedule: "* * * * * *", action: { type: "exec", command: "echo", args: ["tick"] } });
	await waitFor(() => cronEvents.some((e) => e.event.type === "cron:complete"), "a cronEvent");
	await handle.cancelCronJob("now");
	out.cronEvent = cronEvents.find((e) => e.event.type === "cron:complete");
	await conn.dispose();
	return out;
}

// ---- examples/docs/cron/schedule-session.ts and agentos-typecheck's cron options --------
async function cron() {
	const handle = client.vm.getOrCreate(key("cron"));
	const daily = await handle.scheduleCron({
		schedule: "0 9 * * *",
		action: { type: "session", agentType: "local", prompt: "Review the logs in /workspace/logs/ and summarize any errors",
			options: { cwd: "/workspace" } } });
	const typed = await handle.scheduleCron({ schedule: "*/5 * * * *",
		action: { type: "exec", command: "echo", args: ["tick"] }, overlap: "skip" });
	const jobs = await handle.listCronJobs();
	await handle.cancelCronJob(daily.id);
	await handle.cancelCronJob(typed.id);
	return { ids: [typeof daily.id, typeof typed.id], jobs, afterCancel: await handle.listCronJobs() };
}

// ---- examples/docs/multiplayer/reconnect-replay.ts and shared-output.ts -----------------
async function multiplayer() {
	const agent = client.vm.getOrCreate(key("shared-agent"));
	const { sessionId } = await agent.createSession("local");
	await agent.sendPrompt(sessionId, "hello");
	const events = await agent.getSessionEvents(sessionId);
	for (const event of events) say("Replaying:", event.method, event.params);
	const first = agent.connect();
	const second = client.vm.getOrCreate(key("shared-agent")).connect();
	const live = [[], []];
	first.on("sessionEvent", (data) => live[0].push(data.event.method));
	second.on("sessionEvent", (data) => live[1].push(data.event.method));
	await sleep(200); // both subscriptions are in place before the prompt
	await agent.sendPrompt(sessionId, "again");
	await waitFor(() => live[0].length > 0 && live[1].length === live[0].length, "both connections' events");
	await first.dispose();
	await second.dispose();
	return { replayed: events.length, live: live.map((l) => l.length) };
}

// ---- examples/docs/approvals/auto-approve-client.ts and crash-course/permissions-client.ts
async function approvals(reply) {
	const agent = client.vm.getOrCreate(key(`approvals-${reply}`));
	const conn = agent.connect();
	const requests = [];
	conn.on("permissionRequest", async (data) => {
		requests.push(data.request);
		await agent.respondPermission(data.sessionId, data.request.permissionId, reply);
	});
	const session = await agent.createSession("claude", { env: apiKey() });
	const result = await agent.sendPrompt(session.sessionId, "Write files as needed");
	const written = text(await agent.readFile("/workspace/approved.txt"));
	await conn.dispose();
	return { text: result.text, written, requests: requests.map((r) => ({
		permissionId: typeof r.permissionId, description: typeof r.description, params: typeof r.params })) };
}

const EXAMPLES = {
	quickstart, sessions, core, cron, multiplayer,
	autoApprove: () => approvals("always"), permissions: () => approvals("once"),
};

const results = {};
try {
	for (const [name, example] of Object.entries(EXAMPLES)) {
		try {
			results[name] = await example();
		} catch (err) {
			results[name] = { error: errorInfo(err), stack: err?.stack };
		}
	}
} finally {
	await client.dispose();
}
emit({ results, printed: log.length });
