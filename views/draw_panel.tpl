% draw = product.draw
% counts = draw.counts()
% drawn = draw.state == 'drawn'
<div class="draw" data-draw-state="{{draw.state}}" data-closes-at="{{iso(draw.closes_at)}}" data-winners="{{','.join(str(w) for w in draw.winners)}}">
  <p class="draw__title">{{'Draw closed: the winners are drawn' if drawn else 'Draw: pick a size to enter'}}</p>
  <p class="draw__closes">{{'Closed' if drawn else 'Closes'}} {{iso(draw.closes_at)}}</p>
  <div class="draw__sizes" role="group" aria-label="Enter the draw of {{product.name}}">
  % for item in product.items:
    % if draw.pairs.get(item.id):
    <button type="button" class="draw__size" value="{{item.id}}" aria-pressed="false"{{!' disabled' if drawn else ''}}><span class="draw__size-name">{{item.size}}</span> <span class="draw__count" data-item-id="{{item.id}}" title="entries">{{counts[str(item.id)]}}</span></button>
    % end
  % end
  </div>
  <p class="draw__pairs">{{sum(draw.pairs.values())}} pairs; the number under each size is its entries so far. One entry per shopper: change or withdraw it until the close.</p>
  <p class="draw__mine"></p>
  <button type="button" class="draw__withdraw" hidden>Withdraw my entry</button>
  <p class="draw__result" role="status"></p>
  <p class="draw__commitment">Commitment (SHA-256 of the seed): <code>{{draw.commitment}}</code></p>
</div>
