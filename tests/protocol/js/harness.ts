// Reference harness: the unmodified rivetkit@2.3.19 client code, driven from Python tests.
//
// Bundled by tests/protocol/jsref.py with esbuild (`--alias:@=<rivetkit>/src`), so every
// import below is the npm package's own TypeScript source. Each op repeats, call for
// call, what the client does (file and function named next to it). Reads one JSON array
// of jobs on stdin, writes one JSON array of results on stdout.
//
// Values cross the boundary in a tagged form that keeps JS types apart:
// {"$bigint":"5"}, {"$u8":"<hex>"}, {"$ab":"<hex>"}, {"$undefined":1}, {"$obj":{...}},
// {"$num":"NaN"}; arrays, strings, booleans, null and finite numbers are themselves.
import {
	CLIENT_PROTOCOL_TO_CLIENT,
	CLIENT_PROTOCOL_TO_SERVER,
	CURRENT_VERSION,
	HTTP_ACTION_REQUEST_VERSIONED,
	HTTP_ACTION_RESPONSE_VERSIONED,
	HTTP_RESPONSE_ERROR_VERSIONED,
} from "@/common/client-protocol-versioned";
import {
	HttpActionRequestSchema,
	HttpActionResponseSchema,
	HttpResponseErrorSchema,
	ToClientSchema,
	ToServerSchema,
} from "@/common/client-protocol-zod";
import { parseWebSocketProtocols } from "@/common/actor-websocket";
import {
	decodeCborCompat,
	deserializeWithEncoding,
	encodeCborCompat,
	serializeWithEncoding,
} from "@/serde";
import { bufferToArrayBuffer } from "@/utils";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const unhex = (s: string) => new Uint8Array(Buffer.from(s, "hex"));

function describe(v: any): any {
	if (v === undefined) return { $undefined: 1 };
	if (v === null || typeof v === "string" || typeof v === "boolean") return v;
	if (typeof v === "number") return Number.isFinite(v) ? v : { $num: String(v) };
	if (typeof v === "bigint") return { $bigint: v.toString() };
	if (v instanceof Uint8Array) return { $u8: hex(v) };
	if (v instanceof ArrayBuffer) return { $ab: hex(new Uint8Array(v)) };
	if (Array.isArray(v)) return v.map(describe);
	if (v instanceof Map) return { $map: [...v.entries()].map(([k, x]) => [describe(k), describe(x)]) };
	if (v instanceof Set) return { $set: [...v.values()].map(describe) };
	const out: Record<string, unknown> = {};
	for (const [k, x] of Object.entries(v)) out[k] = describe(x);
	return { $obj: out };
}

function build(v: any): any {
	if (Array.isArray(v)) return v.map(build);
	if (v === null || typeof v !== "object") return v;
	if ("$bigint" in v) return BigInt(v.$bigint);
	if ("$u8" in v) return unhex(v.$u8);
	if ("$ab" in v) return bufferToArrayBuffer(unhex(v.$ab));
	if ("$undefined" in v) return undefined;
	const out: Record<string, unknown> = {};
	for (const [k, x] of Object.entries(v.$obj)) out[k] = build(x);
	return out;
}

const frame = (out: string | Uint8Array) =>
	typeof out === "string" ? { text: out } : { hex: hex(out) };
const input = (job: any): string | Uint8Array =>
	job.text !== undefined ? job.text : unhex(job.hex);

// client/actor-conn.ts #sendMessage
function toServer(job: any) {
	const message = build(job.message);
	return frame(
		serializeWithEncoding(
			job.encoding,
			message,
			CLIENT_PROTOCOL_TO_SERVER,
			CURRENT_VERSION,
			ToServerSchema,
			(msg: any) => msg,
			(msg: any) => {
				if (msg.body.tag === "ActionRequest") {
					return {
						body: {
							tag: "ActionRequest",
							val: {
								id: msg.body.val.id,
								name: msg.body.val.name,
								args: bufferToArrayBuffer(encodeCborCompat(msg.body.val.args)),
							},
						},
					};
				}
				return msg;
			},
		),
	);
}

// client/actor-conn.ts #parseMessage (the frame as the WebSocket delivers it)
function parseToClient(job: any) {
	const msg: any = deserializeWithEncoding(
		job.encoding,
		input(job),
		CLIENT_PROTOCOL_TO_CLIENT,
		ToClientSchema,
		(msg: any): any => {
			if (msg.body.tag !== "Error" || !msg.body.val.actor) return msg;
			return {
				body: {
					tag: "Error",
					val: {
						...msg.body.val,
						actor: { ...msg.body.val.actor, generation: Number(msg.body.val.actor.generation) },
					},
				},
			};
		},
		(msg: any): any => {
			if (msg.body.tag === "Error") {
				return {
					body: {
						tag: "Error",
						val: {
							group: msg.body.val.group,
							code: msg.body.val.code,
							message: msg.body.val.message,
							metadata: msg.body.val.metadata
								? decodeCborCompat(new Uint8Array(msg.body.val.metadata))
								: null,
							actionId: msg.body.val.actionId,
							actor: msg.body.val.actor
								? {
										actorId: msg.body.val.actor.actorId,
										generation: Number(msg.body.val.actor.generation),
										key: msg.body.val.actor.key ?? undefined,
									}
								: undefined,
						},
					},
				};
			} else if (msg.body.tag === "ActionResponse") {
				return {
					body: {
						tag: "ActionResponse",
						val: { id: msg.body.val.id, output: decodeCborCompat(new Uint8Array(msg.body.val.output)) },
					},
				};
			} else if (msg.body.tag === "Event") {
				return {
					body: {
						tag: "Event",
						val: { name: msg.body.val.name, args: decodeCborCompat(new Uint8Array(msg.body.val.args)) },
					},
				};
			}
			return msg;
		},
	);
	return { value: describe(msg) };
}

// The actor side of the same schema (what a RivetKit server accepts from a client).
function parseToServer(job: any) {
	const msg: any = deserializeWithEncoding(
		job.encoding,
		input(job),
		CLIENT_PROTOCOL_TO_SERVER,
		ToServerSchema,
		(msg: any) => msg,
		(msg: any) =>
			msg.body.tag === "ActionRequest"
				? {
						body: {
							tag: "ActionRequest",
							val: { ...msg.body.val, args: decodeCborCompat(new Uint8Array(msg.body.val.args)) },
						},
					}
				: msg,
	);
	return { value: describe(msg) };
}

// client/actor-handle.ts action(): requestToJson / requestToBare
function httpActionRequest(job: any) {
	return frame(
		serializeWithEncoding(
			job.encoding,
			build(job.args),
			HTTP_ACTION_REQUEST_VERSIONED,
			CURRENT_VERSION,
			HttpActionRequestSchema,
			(args: any) => ({ args }),
			(args: any) => ({ args: bufferToArrayBuffer(encodeCborCompat(args)) }),
		),
	);
}

// The actor side of an HTTP action body.
function parseHttpActionRequest(job: any) {
	const args = deserializeWithEncoding(
		job.encoding,
		input(job),
		HTTP_ACTION_REQUEST_VERSIONED,
		HttpActionRequestSchema,
		(json: any) => json.args,
		(bare: any) => decodeCborCompat(new Uint8Array(bare.args)),
	);
	return { value: describe(args) };
}

// client/actor-handle.ts action(): responseFromJson / responseFromBare, via client/utils.ts
// sendHttpRequest, which hands over the body as bytes.
function parseHttpActionResponse(job: any) {
	const output = deserializeWithEncoding(
		job.encoding,
		unhex(job.hex),
		HTTP_ACTION_RESPONSE_VERSIONED,
		HttpActionResponseSchema,
		(json: any) => json.output,
		(bare: any) => decodeCborCompat(new Uint8Array(bare.output)),
	);
	return { value: describe(output) };
}

// client/utils.ts sendHttpRequest, the `!response.ok` branch.
function parseHttpError(job: any) {
	const encoding = job.contentType?.includes("application/json") ? "json" : job.encoding;
	const error = deserializeWithEncoding(
		encoding,
		unhex(job.hex),
		HTTP_RESPONSE_ERROR_VERSIONED,
		HttpResponseErrorSchema,
		(json: any): any => ({
			...json,
			actor: json.actor ? { ...json.actor, generation: Number(json.actor.generation) } : undefined,
		}),
		(bare: any): any => ({
			group: bare.group,
			code: bare.code,
			message: bare.message,
			metadata: bare.metadata ? decodeCborCompat(new Uint8Array(bare.metadata)) : undefined,
			actor: bare.actor
				? {
						actorId: bare.actor.actorId,
						generation: Number(bare.actor.generation),
						key: bare.actor.key ?? undefined,
					}
				: undefined,
		}),
	);
	return { value: describe(error) };
}

// common/actor-websocket.ts: how a RivetKit server reads the subprotocol header.
function wsProtocols(job: any) {
	return { value: describe(parseWebSocketProtocols(job.header)) };
}

const ops: Record<string, (job: any) => any> = {
	to_server: toServer,
	parse_to_client: parseToClient,
	parse_to_server: parseToServer,
	http_action_request: httpActionRequest,
	parse_http_action_request: parseHttpActionRequest,
	parse_http_action_response: parseHttpActionResponse,
	parse_http_error: parseHttpError,
	ws_protocols: wsProtocols,
};

let raw = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (raw += chunk));
process.stdin.on("end", () => {
	const results = JSON.parse(raw).map((job: any) => {
		try {
			return ops[job.op](job);
		} catch (err) {
			return { error: String((err as Error)?.message ?? err).slice(0, 300) };
		}
	});
	process.stdout.write(JSON.stringify(results));
});
